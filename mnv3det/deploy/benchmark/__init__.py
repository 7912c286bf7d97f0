"""The speed table of ``mnv3det benchmark``."""

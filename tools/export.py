"""Export SSDLite (with box decoding + NMS) or LR-ASPP to ONNX, optionally int8.

Same as ``mnv3det export``; see ``python tools/export.py --help`` and docs/deployment.md.
"""

import sys

from mnv3det.cli.export import main

if __name__ == "__main__":
    sys.exit(main())

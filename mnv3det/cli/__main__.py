"""``python -m mnv3det.cli``: the same as the ``mnv3det`` command."""

import sys

from mnv3det.cli import main

sys.exit(main())

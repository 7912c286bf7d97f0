"""Speed table of SSDLite / LR-ASPP (ours eager, fused, ONNX fp32/int8) next to torchvision's.

Same as ``mnv3det benchmark``; see ``python tools/benchmark.py --help`` and docs/deployment.md.
"""

import sys

from mnv3det.cli.benchmark import main

if __name__ == "__main__":
    sys.exit(main())

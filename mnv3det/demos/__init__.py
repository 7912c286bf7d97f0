"""``mnv3det demo``: train the real models on generated data on the CPU.

``mnv3det demo detection`` runs :mod:`mnv3det.demos.detection` (SSDLite on generated
COCO-format shapes), ``mnv3det demo segmentation`` runs :mod:`mnv3det.demos.segmentation`
(LR-ASPP on generated Cityscapes-format street scenes); plain ``mnv3det demo`` runs both.
Remaining arguments go to the chosen demo (``mnv3det demo detection --help``).
"""

from __future__ import annotations

import importlib

DEMOS = {"detection": "mnv3det.demos.detection", "segmentation": "mnv3det.demos.segmentation"}
HELP = """usage: mnv3det demo [detection|segmentation] [options]

Train the real models on generated data on the CPU, evaluate them with the real metrics and
write pictures of their predictions.

  detection      SSDLite-MobileNetV3-Small on generated COCO-format shapes (pycocotools mAP)
  segmentation   LR-ASPP-MobileNetV3-Small on generated Cityscapes-format street scenes (mIoU)
  (none)         both, one after the other

The options go to the chosen demo: see `mnv3det demo detection --help` and
`mnv3det demo segmentation --help`.
"""


def main(argv: list[str]) -> int:
    """Dispatch to one demo, or run every demo when none is named."""
    if argv and argv[0] in ("-h", "--help"):
        print(HELP)
        return 0
    if argv and argv[0] in DEMOS:
        return int(importlib.import_module(DEMOS[argv[0]]).main(argv[1:]) or 0)
    if argv and not argv[0].startswith("-"):
        raise SystemExit(f"mnv3det demo: unknown demo {argv[0]!r}; choose from {sorted(DEMOS)}")
    status = 0
    for name, module in DEMOS.items():
        try:
            demo = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            print(f"[demo] {name}: not available yet")
            continue
        print(f"\n===== mnv3det demo {name} =====")
        status = status or int(demo.main(list(argv)) or 0)
    return status

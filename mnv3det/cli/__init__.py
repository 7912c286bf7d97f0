"""The ``mnv3det`` command.

* ``mnv3det fit|validate|test|predict --config CONFIG.yaml ...``: LightningCLI. The config
  names the task (``model.class_path``) and data module (``data.class_path``), so detection
  and segmentation share one command; ``--print_config`` works as usual.
* ``mnv3det demo [detection|segmentation]``: train on generated data on the CPU (both by default).
* ``mnv3det info``: parameter/MAdds/taps table of every MobileNetV3 variant.
* ``mnv3det export`` / ``mnv3det int8-accuracy`` / ``mnv3det benchmark``: deployment tools
  (see their ``--help``).

User errors (wrong paths, bad values, checkpoints that do not fit) are printed as one line with
the fix (:mod:`mnv3det.cli.errors`); ``--traceback`` or ``MNV3DET_TRACEBACK=1`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mnv3det.cli.errors import run_reporting_user_errors
from mnv3det.help_format import DefaultsHelpFormatter

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
TOOL_SUBCOMMANDS = {
    "demo": "mnv3det.demos",
    "export": "mnv3det.cli.export",
    "int8-accuracy": "mnv3det.cli.int8_accuracy",
    "benchmark": "mnv3det.cli.benchmark",
}
USAGE = """usage: mnv3det [--version] {fit,validate,test,predict,demo,info,export,int8-accuracy,benchmark} ...

  fit|validate|test|predict  LightningCLI; e.g. mnv3det fit --config configs/ssdlite320_mnv3_large_coco.yaml
  demo [detection|segmentation]  train on generated data on the CPU and print the metrics
  info                       MobileNetV3 variants: params, MAdds@224, taps
  export                     ONNX export (see mnv3det export --help)
  int8-accuracy              fp32 vs int8 accuracy via the tasks' validation (see --help)
  benchmark                  speed table (see mnv3det benchmark --help)
"""


def version_line() -> str:
    """``mnv3det X (torch Y, torchvision Z, lightning W)``."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    parts = ", ".join(f"{name} {installed(name)}" for name in ("torch", "torchvision", "lightning"))
    return f"mnv3det {installed('mnv3det')} ({parts})"


def info_main(argv: list[str]) -> int:
    """``mnv3det info``: print the variant table."""
    parser = argparse.ArgumentParser(
        prog="mnv3det info",
        formatter_class=DefaultsHelpFormatter,
        description="Print every MobileNetV3 variant (Large/Small, widths, reduced tail): "
        "parameters, MAdds at 224x224 and the taps with their channels and strides.",
    )
    parser.parse_args(argv)
    from mnv3det.info import info_table

    print(info_table())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mnv3det`` console script."""
    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        print(version_line())
        return 0
    command, rest = argv[0], argv[1:]
    return run_reporting_user_errors(
        command, rest, lambda args: _run_command(command, args, from_console)
    )


def _run_command(command: str, rest: list[str], from_console: bool) -> int:
    if command in LIGHTNING_SUBCOMMANDS:
        from mnv3det.cli.lightning_cli import print_help_with_config_classes, run_lightning_cli

        if {"-h", "--help"} & set(rest) and {"-c", "--config"} & {a.split("=")[0] for a in rest}:
            print_help_with_config_classes(command, rest)
            return 0

        if from_console:
            # LightningCLI reads sys.argv itself (given args too, it warns that both were
            # given): hand it the arguments without ours (--traceback).
            sys.argv[1:] = [command, *rest]
            run_lightning_cli(None)
        else:
            run_lightning_cli([command, *rest])
        return 0
    if command == "info":
        return info_main(rest)
    if command in TOOL_SUBCOMMANDS:
        try:
            module = importlib.import_module(TOOL_SUBCOMMANDS[command])
        except ModuleNotFoundError as err:
            if err.name != TOOL_SUBCOMMANDS[command]:
                raise
            print(f"mnv3det {command}: not available in this version", file=sys.stderr)
            return 2
        return int(module.main(rest) or 0)
    print(f"mnv3det: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2

"""``mnv3det fit|validate|test|predict``: LightningCLI with one folder per run.

The config names the task (``model.class_path``) and the data module (``data.class_path``), so
detection and segmentation share one command. Before the classes are built,
:func:`mnv3det.cli.runs.prepare_run_folder` pins every logger to one ``version_N`` folder and
turns ``--ckpt_path last`` into the newest ``last.ckpt`` of that config's runs, and a
``--ckpt_path`` file is read by :func:`mnv3det.weights.read_checkpoint` first, so a missing,
truncated or foreign file is one of our errors naming it (printed as one line by the command).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import inspect
import re
from collections.abc import Iterator
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mnv3det.cli.quiet import quiet_dependency_noise
from mnv3det.cli.runs import prepare_run_folder
from mnv3det.tasks.guards import install_run_guards
from mnv3det.weights import CheckpointFormatError, read_checkpoint


class ConfigArgumentError(ValueError):
    """An unknown, misspelt or invalid command-line option or config key."""


def _option_strings(parser: argparse.ArgumentParser) -> Iterator[str]:
    """Every ``--option`` of a parser and of its subcommand parsers."""
    for action in parser._actions:
        yield from (s for s in action.option_strings if s.startswith("--"))
        for sub in getattr(action, "choices", None) or {}:
            if isinstance(action.choices[sub], argparse.ArgumentParser):
                yield from _option_strings(action.choices[sub])


def explain_argument_error(message: str, parser: argparse.ArgumentParser) -> str:
    """The parser's message plus the nearest valid option for each unknown one."""
    known = sorted(set(_option_strings(parser)))
    unknown = re.findall(r"--[\w.\-]+", message) + [
        "--" + key for key in re.findall(r"[Kk]ey ['\"]([\w.\-]+)['\"]", message)
    ]
    hints = []
    for option in dict.fromkeys(unknown):
        if option in known:
            continue
        close = difflib.get_close_matches(option, known, n=1, cutoff=0.75)
        if close:
            hints.append(f"{option} -> did you mean {close[0]}?")
    text = message.strip().splitlines()[0] if message.strip() else "invalid arguments"
    nested = _class_path_problem(message)
    if nested:  # e.g. 'Parser key "model": ... class_path X: Option 'lrr' is not accepted'
        key = re.match(r'Parser key "([\w.]+)"', text)
        class_path, detail = nested
        text = f"{key.group(1) if key else 'config'} ({class_path}): {detail}"
        hints += _init_arg_hints(class_path, detail)
    if hints:
        text += "; " + "; ".join(hints)
    return text + " (--help lists the options; --print_config shows the merged config)"


def _class_path_problem(message: str) -> tuple[str, str] | None:
    """``(class_path, problem)`` from jsonargparse's nested Union message, on one line."""
    lines = message.splitlines()
    for i, line in enumerate(lines):
        found = re.search(r"class_path '([\w.]+)':\s*$", line)
        if found:
            indent = len(line) - len(line.lstrip())
            block = []
            for inner in lines[i + 1 :]:
                if inner.strip() and len(inner) - len(inner.lstrip()) <= indent:
                    break
                block.append(inner.strip())
            return found.group(1), " ".join(b for b in block if b)
    return None


def _init_arg_hints(class_path: str, detail: str) -> list[str]:
    """``did you mean`` for an init argument the class does not take."""
    option = re.search(r"Option '(\w+)' is not accepted", detail)
    if not option:
        return []
    module, _, name = class_path.rpartition(".")
    try:
        params = list(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    close = difflib.get_close_matches(option.group(1), params, n=1, cutoff=0.6)
    return [f"did you mean {close[0]!r}?"] if close else []


#: ``ckpt_path`` values Lightning resolves itself.
_SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


def check_ckpt_path(path: str) -> None:
    """Raise one of our errors, naming ``path``, unless it is a readable mnv3det ``.ckpt``."""
    ckpt = read_checkpoint(path)  # CheckpointNotFoundError / CheckpointReadError / Unsafe...
    if not ckpt.described_by:
        raise CheckpointFormatError(
            f"--ckpt_path {path}: not a checkpoint written by mnv3det fit (no model description "
            "or task hyper-parameters). To start from a weights file (e.g. torchvision's), pass "
            "it as --model.init_args.weights instead."
        )


__all__ = ["MnV3DetCLI", "run_lightning_cli"]


class MnV3DetCLI(LightningCLI):
    """LightningCLI whose runs resume with ``--ckpt_path last`` (see :mod:`mnv3det.cli.runs`).

    Its parsers refuse abbreviated options (argparse would take ``--trainer.max_epoch`` as
    ``--trainer.max_epochs``) and raise parse errors instead of printing the whole usage, so
    the command prints them as one line with the nearest valid key
    (:mod:`mnv3det.cli.errors`).
    """

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as err:
            raise ConfigArgumentError(explain_argument_error(str(err), parser)) from err

    def _parse_ckpt_path(self) -> None:
        # LightningCLI's hook that reads the checkpoint's hyper-parameters into the config: the
        # run folder and "last" are resolved first, and the file is checked before torch.load.
        subcommand = self.config.get("subcommand")
        if subcommand:
            prepare_run_folder(self.config, subcommand)
            ckpt_path = self.config[subcommand].get("ckpt_path")
            if ckpt_path and str(ckpt_path) not in _SPECIAL_CKPT_PATHS:
                check_ckpt_path(str(ckpt_path))
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        # atomic checkpoint files, sync_batchnorm only where it runs (mnv3det.tasks.guards)
        return install_run_guards(super().instantiate_trainer(**kwargs))


def run_lightning_cli(args: list[str] | None) -> None:
    """Run the CLI with the task/data classes named in the config.

    Args:
        args: the subcommand and its arguments; ``None`` reads ``sys.argv`` (console script).
    """
    quiet_dependency_noise()
    # Imported so that jsonargparse knows the subclasses by their short names
    # (`--model.help DetectionTask`, `class_path: CocoDataModule`).
    import mnv3det.tasks.detection
    import mnv3det.tasks.detection_data
    import mnv3det.tasks.segmentation
    import mnv3det.tasks.segmentation_data  # noqa: F401

    MnV3DetCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def _config_classes(args: list[str]) -> dict[str, str]:
    """``{"model": class_path, "data": class_path}`` named by the ``--config`` files in ``args``."""
    import yaml

    found: dict[str, str] = {}
    for i, arg in enumerate(args):
        path = args[i + 1] if arg in ("-c", "--config") and i + 1 < len(args) else None
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if path is None:
            continue
        with open(path) as file:
            config = yaml.safe_load(file) or {}
        for key in ("model", "data"):
            value = config.get(key)
            if isinstance(value, dict) and value.get("class_path"):
                found[key] = str(value["class_path"])
    return found


def print_help_with_config_classes(subcommand: str, args: list[str]) -> None:
    """``mnv3det fit --config X --help``: Lightning's help, then the options (with defaults) of
    the model and data classes the config names, which LightningCLI's help leaves out."""
    classes = _config_classes(args)
    for argv in (
        [subcommand, "--help"],
        *([subcommand, f"--{key}.help", cls] for key, cls in classes.items()),
    ):
        if argv[1] != "--help":
            print(f"\n{argv[1][2:-5]} options of {argv[2]} (from the config):\n")
        with contextlib.suppress(SystemExit):  # each --help prints, then exits
            run_lightning_cli(argv)

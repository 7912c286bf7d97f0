"""Model descriptions in task checkpoints: checkpoints that know their model.

Both tasks call :func:`describe_in_checkpoint` from ``on_save_checkpoint`` (after
:func:`mnv3det.tasks.checkpoints.make_checkpoint_safe`):

* ``checkpoint["mnv3det"]`` holds the builder arguments (``SSDLite.description`` /
  ``LRASPP.description``) plus the data module's label map and class names, which
  :func:`mnv3det.models.from_checkpoint.load_model` reads back;
* the hyper-parameters name the task class (``_class_path``), so ``mnv3det validate/predict
  --ckpt_path`` (LightningCLI re-parses them in subclass mode) accepts checkpoints of tasks
  built in Python, such as the demo's, and the ``weights``/``weights_backbone`` files the run
  started from are cleared (the checkpoint holds the weights; those files may be gone).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mnv3det.tasks.checkpoints import plain
from mnv3det.weights import DESCRIPTION_KEY

__all__ = ["INIT_WEIGHT_HPARAMS", "datamodule_facts", "describe_in_checkpoint"]

#: Hyper-parameters naming files to initialise from: not needed once the weights are in the
#: checkpoint (and those files may be gone when it is loaded again).
INIT_WEIGHT_HPARAMS = ("weights", "weights_backbone")


def describe_in_checkpoint(
    checkpoint: dict[str, Any], task: Any, description: Mapping[str, Any]
) -> None:
    """Store the model description and make the hyper-parameters re-loadable.

    Args:
        checkpoint: the dict Lightning is about to save (changed in place).
        task: the LightningModule (its class becomes ``_class_path`` when missing).
        description: the model's description plus data facts (plain types).
    """
    checkpoint[DESCRIPTION_KEY] = plain(dict(description))
    hparams = checkpoint.get("hyper_parameters")
    if isinstance(hparams, dict):
        cls = type(task)
        hparams.setdefault("_class_path", f"{cls.__module__}.{cls.__qualname__}")
        for key in INIT_WEIGHT_HPARAMS:
            if key in hparams:
                hparams[key] = None


def datamodule_facts(task: Any, num_classes: int | None = None) -> dict[str, Any]:
    """``label_map`` (label -> data set id) and ``class_names`` of the trainer's data module.

    Args:
        task: the LightningModule (its trainer's ``datamodule`` is read, when attached).
        num_classes: when given, class names of another length are left out.

    Returns:
        The facts the data module has (``{}`` without one).
    """
    trainer = getattr(task, "_trainer", None)
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    facts: dict[str, Any] = {}
    if dm is None:
        return facts
    for key, attr in (("label_map", "label_to_cat_id"), ("class_names", "class_names")):
        try:
            value = getattr(dm, attr, None)
        except (OSError, ValueError, KeyError):  # e.g. annotation file not readable here
            value = None
        if isinstance(value, Mapping):
            facts[key] = {int(k): int(v) for k, v in value.items()}
        elif isinstance(value, (list, tuple)) and num_classes in (None, len(value)):
            facts[key] = [str(v) for v in value]
    return facts

"""Keep the command's output to what a user can act on.

Two messages of our dependencies are filtered where they are raised, by their exact text, for
the ``mnv3det`` command only (a library user's process is left alone):

* Lightning's "Tip: ... try installing litlogger" line, printed by every run;
* torch's ``FutureWarning`` "isinstance(treespec, LeafSpec) is deprecated", which Lightning 2.6
  triggers on every batch transfer with torch >= 2.10 (Lightning's code, not ours or the user's).

Everything else (Lightning's own advice on logging intervals, DataLoader workers ...) stays.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["quiet_dependency_noise"]

_LIGHTNING_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)
_TIP_PREFIX = "💡 Tip: For seamless cloud logging"


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TIP_PREFIX)


def quiet_dependency_noise() -> None:
    """Install the two filters (idempotent)."""
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLitLoggerTip) for f in logger.filters):
            logger.addFilter(_DropLitLoggerTip())
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )

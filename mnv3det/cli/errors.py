"""User errors at the terminal: one or two lines with the fix, not a traceback.

Errors a user causes (a wrong path, a bad config value, a checkpoint that does not fit) are raised
as ``ValueError`` / ``FileNotFoundError`` / ``KeyError`` subclasses whose message names the file,
key or argument and the fix (the project's conventions). The ``mnv3det`` command prints such an
error as ``mnv3det <command>: error: <message>`` and exits with status 2. ``--traceback`` (any
position) or ``MNV3DET_TRACEBACK=1`` shows the full traceback instead; so does every other
exception, which is a bug to report.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

__all__ = ["TRACEBACK_ENV", "is_user_error", "run_reporting_user_errors"]

TRACEBACK_ENV = "MNV3DET_TRACEBACK"
TRACEBACK_FLAG = "--traceback"
_OUR_PACKAGES = ("mnv3det", "heads")
_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def is_user_error(err: BaseException) -> bool:
    """Our own ValueError/KeyError/FileNotFoundError subclasses, and missing/unreadable files."""
    if isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return True
    ours = type(err).__module__.split(".")[0] in _OUR_PACKAGES
    return ours and isinstance(err, (ValueError, KeyError, TypeError, OSError))


def user_message(err: BaseException) -> str:
    """The message of a user error (a DataLoader worker's re-raised traceback left out)."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if _WORKER_TRACEBACK in text:  # raised in a worker: torch puts the worker's traceback first
        text = text.rstrip().splitlines()[-1]
        prefix = f"{type(err).__name__}: "
        text = text[len(prefix) :] if text.startswith(prefix) else text
    return text.strip()


def run_reporting_user_errors(
    command: str, argv: list[str], run: Callable[[list[str]], int]
) -> int:
    """Run ``run(argv)``; print a user error as one line (exit 2) unless a traceback is asked for.

    Args:
        command: the subcommand, for the message prefix.
        argv: its arguments; ``--traceback`` is removed from them.
        run: the subcommand's entry point.

    Returns:
        The exit status.
    """
    show_traceback = TRACEBACK_FLAG in argv or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != TRACEBACK_FLAG]
    try:
        return run(argv)
    except Exception as err:
        if show_traceback or not is_user_error(err):
            raise
        print(f"mnv3det {command}: error: {user_message(err)}", file=sys.stderr)
        print(
            f"  (run again with {TRACEBACK_FLAG} or {TRACEBACK_ENV}=1 for the full traceback)",
            file=sys.stderr,
        )
        return 2

"""The help formatter of every ``mnv3det`` subcommand: each option shows its default.

``argparse.ArgumentDefaultsHelpFormatter`` adds the default only to options that have a help
text; this one adds it to every option that has a default, so ``--help`` never hides one.
"""

from __future__ import annotations

import argparse
import copy

__all__ = ["DefaultsHelpFormatter"]


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``(default: X)`` after every option with a default (flags and required ones excepted)."""

    @staticmethod
    def _has_default(action: argparse.Action) -> bool:
        return bool(
            not any(action.default is v for v in (None, argparse.SUPPRESS, False))
            and action.option_strings
            and not action.required
        )

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and self._has_default(action):
            # argparse prints no help line at all for help=None: give it one with the default
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if self._has_default(action) and "%(default)" not in text:
            return f"{text} (default: %(default)s)".strip()
        return text

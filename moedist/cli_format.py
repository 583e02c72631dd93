"""The help formatter of every moedist subcommand: argparse's "(default: X)" where it says something.

argparse's `ArgumentDefaultsHelpFormatter` appends "(default: None)" to positionals and required
flags and "(default: False)" to switches, and repeats a default the help text already states.
"""
from __future__ import annotations

import argparse


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an optional flag's help unless the text already states its default,
    the flag is a switch (takes no value), or the argument is positional or required."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default is argparse.SUPPRESS or action.required
                or not action.option_strings or action.nargs == 0):
            return text
        return super()._get_help_string(action)

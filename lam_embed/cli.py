"""Shared pieces of the project's command-line interfaces."""

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, except where an option's help already says its default.

    Options whose default is computed at run time (a device, a data folder from the environment)
    describe it in their own help; appending argparse's "(default: None)" to that would contradict it.
    """

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text:
            return text
        return super()._get_help_string(action)


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value

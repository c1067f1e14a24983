"""What every package's flags share: the argparse group a flag joins, and the number types.

Each sub-package declares the flags it reads in its own `flags.py` (`add_flags(parser)`), next to
the code that reads them; exporter/cli.py only calls them in turn. Two packages may put flags in
one group (the SGLang poller and the exit log share "sglang accounting and exits"), so a group
is looked up by its title before it is made.
"""

from __future__ import annotations

import argparse


def group(parser: argparse.ArgumentParser, title: str, description: str | None = None) -> argparse._ArgumentGroup:
    """The parser's group of that title, made on first use."""
    for existing in parser._action_groups:
        if existing.title == title:
            return existing
    return parser.add_argument_group(title, description)


def seconds(
    group: argparse._ArgumentGroup, flag: str, dest: str, default: float, help_text: str, zero: bool = False
) -> None:
    """A duration option: a positive number of seconds (or zero too, where 0 means "off" or "always")."""
    kind = non_negative_float if zero else positive_float
    group.add_argument(flag, dest=dest, type=kind, default=default, metavar="SECONDS", help=help_text)


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value

"""Checks of command-line values, run by argparse before any work: a bad value is a one-line
error naming the flag (``pave rethink: error: argument --max-length: ...``)."""

from __future__ import annotations

import argparse
import math
import re
from typing import Any, Callable


def _at_least(parse: Callable[[str], float], low: float, what: str) -> Callable[[str], Any]:
    def check(text: str):
        value = parse(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return check


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def finite_float(text: str) -> float:
    """A finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


positive_int = _at_least(_int, 1, "a positive integer")
count_or_all = _at_least(_int, 0, "a positive integer (or 0 for all)")
nonnegative_int = _at_least(_int, 0, "a non-negative integer")
nonnegative_float = _at_least(finite_float, 0.0, "a finite number >= 0")

#: every seed of the package seeds torch, Python's random and numpy (which takes 0 .. 2^32 - 1)
SEED_MAX = 2**32 - 1


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2^32 - 1]."""
    value = _int(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, {SEED_MAX}], got {text}")
    return value


def _in_interval(low: float, high: float, *, closed_low: bool, closed_high: bool) -> Callable[[str], float]:
    if math.isinf(high):
        what = f"a number {'>=' if closed_low else '>'} {low:g}"
    else:
        what = f"in {'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"

    def check(text: str) -> float:
        value = finite_float(text)
        if value < low or value > high or (value == low and not closed_low) or (value == high and not closed_high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return check


positive_float = _in_interval(0.0, math.inf, closed_low=False, closed_high=False)
proper_fraction = _in_interval(0.0, 1.0, closed_low=True, closed_high=False)  # a share that leaves some
unit_interval = _in_interval(0.0, 1.0, closed_low=True, closed_high=True)


def regex(text: str) -> str:
    """A valid regular expression."""
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"not a valid regular expression ({exc})") from None
    return text


class DefaultsFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows a flag's default only where there is one to show: not for a required flag, a
    switch, a default of None, or a help text that already says its default; descriptions as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return action.help
        return super()._get_help_string(action)


def plain(doc: str | None) -> str:
    """A module docstring as a command's description: reST literals (````x````) shown as ```x```."""
    return (doc or "").replace("``", "`")


def device(text: str) -> str:
    """``auto``, or a torch device that exists on this machine."""
    if text == "auto":
        return text
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"not a torch device ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device here (torch {torch.__version__}, "
                                             f"CUDA build: {torch.version.cuda or 'no'}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text}: no MPS device here; use cpu")
    return text


def add_setting_flags(parser: argparse.ArgumentParser, settings_cls: type, *, exclude: tuple[str, ...] = (),
                      types: dict[str, Callable[[str], Any]] | None = None, check_when_parsed: bool = False) -> None:
    """One flag per row of a settings table (:func:`pave_plugins.engine.settings.table`): ``--name-with-dashes``,
    its help and default from the row. A number is checked by the row's own rule when the settings are
    built (one line naming the setting), or with ``check_when_parsed`` already by argparse (naming the
    flag); ``types``: a face's own parser for a row (e.g. ``0 = all``)."""
    from pave_plugins.engine.settings import table

    for row in table(settings_cls):
        if row.name in exclude:
            continue
        flag = "--" + row.name.replace("_", "-")
        if row.type is bool:
            parser.add_argument(flag, action="store_true", help=row.help)
        elif row.type is tuple:
            parser.add_argument(flag, nargs="+", metavar="NAME", default=row.default, help=row.help)
        elif row.choices is not None:
            parser.add_argument(flag, choices=row.choices, default=row.default, help=row.help)
        else:
            plain = _int if row.type is int else finite_float
            kind = (types or {}).get(row.name) or (setting(settings_cls, row.name) if check_when_parsed else plain)
            parser.add_argument(flag, type=kind, default=row.default, help=row.help)


def setting_values(args: argparse.Namespace, settings_cls: type) -> dict[str, Any]:
    """The values of a settings table's flags in ``args`` (those the parser has)."""
    from pave_plugins.engine.settings import table

    return {row.name: getattr(args, row.name) for row in table(settings_cls) if hasattr(args, row.name)}


def setting(settings_cls: type, name: str) -> Callable[[str], Any]:
    """The argparse type of one setting of a settings table: a finite number (an integer for an ``int``
    row) checked by the row's own rule (one rule for ``pave purify``, ``pave rethink``, ``pave bench``
    grids and ``pave demo``)."""
    from pave_plugins.engine.settings import table

    (row,) = [r for r in table(settings_cls) if r.name == name]

    def check(text: str) -> Any:
        value = _int(text) if row.type is int else finite_float(text)
        try:
            if row.check is not None:
                row.check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    return check

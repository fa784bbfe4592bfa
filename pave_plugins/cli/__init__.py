"""The ``pave`` command: one sub-command per module, imported lazily.

Each sub-command module defines ``add_parser(subparsers) -> argparse.ArgumentParser`` (which
sets ``func`` as the parser default) so that ``pave --help`` stays fast and a broken optional
dependency of one sub-command does not break the others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from pave_plugins.hosts import HostMissingError

# name -> module; each module provides add_parser(subparsers)
COMMANDS: dict[str, str] = {
    "collect": "pave_plugins.cli.collect",
    "rethink": "pave_plugins.cli.rethink",
    "demo": "pave_plugins.cli.demo",
    "purify": "pave_plugins.cli.purify",
    "bench": "pave_plugins.cli.bench",
}


# library messages name the Python keywords; on the command line the user needs the flags
CLI_HINTS: tuple[tuple[str, str], ...] = (
    ("pass overwrite to replace it", "pass --overwrite to replace it"),
    ("pass on_fingerprint_mismatch='warn' to use it anyway", "pass --allow-fingerprint-mismatch to use it anyway"),
    ("pass allow_different_models to sum anyway", "pass --allow-fingerprint-mismatch to sum anyway"),
    (" (allow_fingerprint_mismatch=True)", ""),
    (" (allow_pickle=True)", ""),
    (" (allow_missing_covariance=True)", ""),
)


def cli_message(exc: BaseException) -> str:
    """The error as the ``pave`` command prints it: Python keywords replaced by the CLI's flags."""
    msg = str(exc)
    for keyword, flag in CLI_HINTS:
        msg = msg.replace(keyword, flag)
    return msg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pave",
        description="PAVE / TSV-M / LoRA-DV model-merging tools (see README.md).",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, including the host libraries' info messages"
    )
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_parser(sub)
    return parser


def _version() -> str:
    """This package's version, and the hosts' that are installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("pave-plugins")
    except PackageNotFoundError:
        own = "(not installed)"
    hosts = []
    for dist, shown in (("mergekit", "mergekit"), ("fusion-bench", "FusionBench")):
        try:
            hosts.append(f"{shown} {version(dist)}")
        except PackageNotFoundError:
            pass
    return own + (f" ({', '.join(hosts)})" if hosts else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # our messages at INFO (DEBUG with -v); the host libraries' (mergekit, transformers, ...)
    # only from WARNING unless -v, so the output stays readable
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in ("pave_plugins", "pave"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        if args.debug or not _anticipated(exc):
            raise
        logging.getLogger("pave").error("%s", cli_message(exc))
        return 2


def _anticipated(exc: BaseException) -> bool:
    """Errors a user's input or machine causes (a bad file, flag, disk full): one line. Anything else
    (a ``TypeError``, a ``KeyError``) is a bug and keeps its traceback."""
    return isinstance(exc, (ValueError, OSError, RuntimeError, HostMissingError)) or (
        type(exc).__name__ == "SafetensorError")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Which errors are a user's input (one line at each face's boundary) and which are bugs.

An error this package raises on purpose about an input or the machine is a ``ValueError`` or an
``OSError`` raised inside ``pave_plugins`` (a bad covariance file, data file, adapter, recipe value,
output path, a full disk). The ``pave`` CLI, ``mergekit-yaml`` and the ``fusion_bench`` CLI print
those as one line naming the culprit; anything else (a ``TypeError``, an error inside a host
library) keeps its traceback. ``PAVE_DEBUG=1`` (``pave --debug``) keeps every traceback.
"""

from __future__ import annotations

import os
import traceback

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def debugging() -> bool:
    return os.environ.get("PAVE_DEBUG", "") not in ("", "0")


def raised_here(exc: BaseException) -> bool:
    """Whether the innermost frame that raised ``exc`` is this package's code."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_PACKAGE + os.sep)


def anticipated(exc: BaseException) -> bool:
    """A ``ValueError`` / ``OSError`` this package raised about an input (see the module docstring)."""
    return isinstance(exc, (ValueError, OSError)) and raised_here(exc)


def first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text.strip() else type(exc).__name__

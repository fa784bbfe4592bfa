"""The boundary of the FusionBench face: an error a user's input causes is one line.

The ``fusion_bench`` CLI logs an uncaught error with its full traceback (FusionBench's rich
handler) and Hydra prints it again. The ``run`` of each algorithm of this package is wrapped
(:func:`one_line_errors`): an anticipated error (:func:`pave_plugins.errors.anticipated`) leaves
it as the same exception type, also a Hydra ``CompactHydraException`` (Hydra then prints only its
message) and marked so that FusionBench's log record of it drops the traceback. Called from Python,
``algorithm.run(pool)`` still raises the package's own exception type with the same message;
``PAVE_DEBUG=1`` keeps the original exception and traceback.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Callable

from pave_plugins.errors import anticipated, debugging, first_line

_COMPACT: dict[type, type] = {}


def _compact_type(cls: type) -> type | None:
    try:
        from hydra.errors import CompactHydraException
    except ImportError:  # pragma: no cover - FusionBench always brings Hydra
        return None
    if cls not in _COMPACT:
        _COMPACT[cls] = type(cls.__name__, (cls, CompactHydraException), {"__module__": cls.__module__,
                                                                        "__qualname__": cls.__qualname__})
    return _COMPACT[cls]


def compact(exc: BaseException) -> BaseException:
    """``exc`` as one line (same type, also a ``CompactHydraException``), or ``exc`` itself."""
    cls = _compact_type(type(exc))
    try:
        one = cls(first_line(exc)) if cls is not None else exc
    except Exception:  # an exception type whose constructor takes other arguments
        return exc
    one._pave_one_line = True  # type: ignore[attr-defined]
    return one


def one_line_errors(run: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an algorithm's ``run``: anticipated errors leave it as :func:`compact` ones."""

    @functools.wraps(run)
    def wrapper(self, *args, **kwargs):
        try:
            return run(self, *args, **kwargs)
        except Exception as exc:
            if debugging() or not anticipated(exc):
                raise
            raise compact(exc) from None

    return wrapper


class _NoTracebackForOneLiners(logging.Filter):
    """FusionBench's CLI logs the error with ``exc_info``: keep the message, drop the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if getattr(exc, "_pave_one_line", False):
            record.exc_info = None
            record.exc_text = None
        return True


def install_log_filter() -> None:
    logger = logging.getLogger("fusion_bench.scripts.cli")
    if not any(isinstance(f, _NoTracebackForOneLiners) for f in logger.filters):
        logger.addFilter(_NoTracebackForOneLiners())


@contextlib.contextmanager
def quiet_host_output():
    """FusionBench's own prints kept out of a log that is not FusionBench's (``pave bench``): the rich
    "Instantiate by calling" panels off, each method's profiler table at DEBUG."""
    from fusion_bench.mixins.simple_profiler import SimpleProfilerMixin
    from fusion_bench.utils.instantiate_utils import set_print_function_call

    original = SimpleProfilerMixin.print_profile_summary

    def to_debug(self, title=None):
        logging.getLogger("pave_plugins.fusion_bench").debug("%s profile%s:\n%s", type(self).__name__,
                                                             f" ({title})" if title else "", self.profiler.summary())

    SimpleProfilerMixin.print_profile_summary = to_debug
    try:
        with set_print_function_call(False):
            yield
    finally:
        SimpleProfilerMixin.print_profile_summary = original

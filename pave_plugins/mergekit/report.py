"""The PAVE rank report of a mergekit merge, and where it is written.

Per tensor and per model: the rank kept, the full rank, the damping added to the covariance, the
relative change ``||dW_PAVE - dW||_F / ||dW||_F`` and the normalised activated pruning error
(PAVE eq. 8); per model the overall preserved-rank ratio ``rho_i = sum_l r_i^l / sum_l R^l``
(PAVE Algorithm 1, line 15).

Where it goes. A mergekit merge method only ever sees one tensor group; mergekit has no
end-of-merge hook for methods and does not tell them the output directory. The method therefore
accumulates the records in the process-wide :class:`RankReport` (thread-safe), and two thin
wrappers around mergekit's own output tasks, installed when the plugin is loaded, give it the
output directory and the end of the merge:

* ``TensorWriterTask.execute`` (the task that opens the output directory; it runs before any tensor
  is saved) records the output path and starts a new report;
* ``FinalizeModel.execute`` (runs once, after the last tensor is written) writes the final
  ``pave_rank_report.json`` atomically next to the merged weights and logs a summary.

Between the two, the report in progress is rewritten atomically at most every few seconds to the
hidden ``.pave_rank_report.partial.json`` (never to ``pave_rank_report.json``): a merge that fails or
is killed leaves the previous merge's ``pave_rank_report.json`` whole. A merge with another method
into a folder that holds a ``pave`` rank report removes that report when it finishes (it would
describe a model that is no longer there). Both wrappers call mergekit's original method first and
never raise (a failure to write the report is logged, the merge is not affected).
For merges without an output directory (mergekit's in-memory API), :func:`last_report` returns
the report object.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from pave_plugins.engine.report import PARTIAL_NAME, REPORT_NAME, RankReport, is_rank_report

logger = logging.getLogger("pave_plugins.mergekit")

__all__ = ["REPORT_NAME", "RankReport", "current_report", "install_output_hooks", "last_report"]

_lock = threading.Lock()
_current: RankReport | None = None
_last: RankReport | None = None


def current_report() -> RankReport:
    """The report of the merge in progress (created on first use)."""
    global _current
    with _lock:
        if _current is None:
            _current = RankReport()
        return _current


def last_report() -> RankReport | None:
    """The report of the merge in progress, or else of the last finished merge in this process."""
    with _lock:
        return _current if _current is not None else _last


def _start_output(out_path: str) -> None:
    """A merge opens its output directory: attach it to the report (start a new one if stale)."""
    global _current
    with _lock:
        if _current is not None and (_current.out_path is not None or _current.finished):
            _current.close()
            _current = None
        if _current is None:
            _current = RankReport()
        _current.attach(out_path)


def _finish_output(out_path: str | None) -> None:
    """The merge wrote its last tensor: write the final report, log the summary, reset."""
    global _current, _last
    with _lock:
        report, _current = _current, None
    if report is None:
        return
    if out_path and not report.out_path:
        report.out_path = str(out_path)
    report.finished = True
    if report.tensors:
        path = report.write()
        if report.out_path:
            _remove(Path(report.out_path) / PARTIAL_NAME)
        logger.info("%s\nrank report: %s", report.summary(), path)
        if not any(r.get("purified") for r in report.tensors.values()):
            logger.warning(
                "pave: no tensor was purified (no covariance matched any weight); "
                "the merge equals the inner method on the plain task vectors"
            )
    elif report.out_path:
        _retire_stale_report(Path(report.out_path))
    report.close()
    with _lock:
        _last = report


def _retire_stale_report(out: Path) -> None:
    """A merge by another method finished in ``out``: a ``pave`` rank report there describes the
    model this merge replaced, so it goes."""
    _remove(out / PARTIAL_NAME)
    stale = out / REPORT_NAME
    if stale.is_file() and is_rank_report(stale):
        _remove(stale)
        logger.warning("pave: removed %s: it described the previous pave merge in that folder, not this merge", stale)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def install_output_hooks(tasks: Any = None) -> bool:
    """Wrap mergekit's ``TensorWriterTask.execute`` and ``FinalizeModel.execute`` (idempotent).

    ``tasks`` is the ``mergekit.io.tasks`` module (imported if not given). Returns False (and
    logs why) when mergekit's output tasks do not look as expected; the merge then still works
    and the report stays available through :func:`last_report`.
    """
    if tasks is None:
        try:
            import mergekit.io.tasks as tasks
        except Exception as exc:  # pragma: no cover
            logger.warning("pave: rank report hooks not installed (%r)", exc)
            return False
    if getattr(tasks, "_pave_output_hooks", False):
        return True
    writer_cls = getattr(tasks, "TensorWriterTask", None)
    final_cls = getattr(tasks, "FinalizeModel", None)
    if writer_cls is None or final_cls is None or "out_path" not in getattr(writer_cls, "model_fields", {}):
        logger.warning("pave: mergekit's output tasks changed; the rank report will not be written to disk")
        return False
    orig_writer = writer_cls.execute
    orig_final = final_cls.execute

    def writer_execute(self, **kwargs):
        result = orig_writer(self, **kwargs)
        try:
            _start_output(self.out_path)
        except Exception:  # pragma: no cover
            logger.warning("pave: could not attach the rank report to %s", self.out_path, exc_info=True)
        return result

    def final_execute(self, writer, **kwargs):
        result = orig_final(self, writer, **kwargs)
        try:
            _finish_output(getattr(writer, "out_path", None) or self.writer_task.out_path)
        except Exception:
            logger.warning("pave: could not write the rank report", exc_info=True)
        return result

    writer_execute.__wrapped__ = orig_writer  # type: ignore[attr-defined]
    final_execute.__wrapped__ = orig_final  # type: ignore[attr-defined]
    writer_cls.execute = writer_execute
    final_cls.execute = final_execute
    tasks._pave_output_hooks = True
    return True

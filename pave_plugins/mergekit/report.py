"""The reports of a mergekit merge (PAVE rank report, RegMean report), and where they are written.

Per tensor and per model: the rank kept, the full rank, the damping added to the covariance, the
relative change ``||dW_PAVE - dW||_F / ||dW||_F`` and the normalised activated pruning error
(PAVE eq. 8); per model the overall preserved-rank ratio ``rho_i = sum_l r_i^l / sum_l R^l``
(PAVE Algorithm 1, line 15). The written reports name each model by its folder (a Hub id as it
is; two folders of one name get ``_2``, ...), not by the path of the merging machine.

Where it goes. A mergekit merge method only ever sees one tensor group; mergekit has no
end-of-merge hook for methods and does not tell them the output directory. The method therefore
accumulates the records in process-wide reports (thread-safe; :class:`RankReport` for ``pave``,
:class:`RegMeanReport` for ``regmean``), and two thin
wrappers around mergekit's own output tasks, installed when the plugin is loaded, give it the
output directory and the end of the merge:

* ``TensorWriterTask.execute`` (the task that opens the output directory; it runs before any tensor
  is saved) records the output path and starts a new report;
* ``FinalizeModel.execute`` (runs once, after the last tensor is written) writes the final
  ``pave_rank_report.json`` (``regmean_report.json``) atomically next to the merged weights and
  logs a summary.

Between the two, the report in progress is rewritten atomically at most every few seconds to the
hidden ``.pave_rank_report.partial.json`` (never to ``pave_rank_report.json``): a merge that fails or
is killed leaves the previous merge's ``pave_rank_report.json`` whole. A merge with another method
into a folder that holds a ``pave`` rank report removes that report when it finishes (it would
describe a model that is no longer there; the same for a ``regmean`` report). Both wrappers call mergekit's original method first and
never raise (a failure to write the report is logged, the merge is not affected).
For merges without an output directory (mergekit's in-memory API), :func:`last_report` returns
the report object.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Sequence

from pave_plugins.cards import folder_name, hub_id
from pave_plugins.engine.report import (
    REGMEAN_REPORT_FORMAT,
    REGMEAN_REPORT_NAME,
    REPORT_FORMAT,
    REPORT_NAME,
    MergeReport,
    RankReport,
    RegMeanReport,
    is_rank_report,
)

logger = logging.getLogger("pave_plugins.mergekit")

__all__ = [
    "REGMEAN_REPORT_NAME", "REPORT_NAME", "RankReport", "RegMeanReport", "current_report", "install_output_hooks",
    "last_report",
]

#: the reports a merge can write, by method (``pave`` with ``inner: regmean`` writes both)
REPORT_KINDS: dict[str, type[MergeReport]] = {"pave": RankReport, "regmean": RegMeanReport}
#: the JSON ``format`` of each kind's report (how a stale one is recognised)
REPORT_FORMATS = {"pave": REPORT_FORMAT, "regmean": REGMEAN_REPORT_FORMAT}

_lock = threading.Lock()
_current: dict[str, MergeReport] = {}
_last: dict[str, MergeReport] = {}
_out_path: str | None = None  # output folder of the merge in progress


def model_names(labels: Sequence[str]) -> dict[str, str]:
    """mergekit's model references as the report names them: a local folder by its name, a Hub id as
    it is, ``model+lora`` as ``name+name``; names shared by two references get ``_2``, ``_3``, ..."""
    def one(label: str) -> str:
        return "+".join(hub_id(p) or folder_name(p) for p in label.split("+"))

    out: dict[str, str] = {}
    taken: set[str] = set()
    for label in labels:
        name, k = one(label), 1
        while (name if k == 1 else f"{name}_{k}") in taken:
            k += 1
        out[label] = name if k == 1 else f"{name}_{k}"
        taken.add(out[label])
    return out


def current_report(kind: str = "pave") -> Any:
    """The ``kind`` report (``pave`` or ``regmean``) of the merge in progress (created on first use)."""
    with _lock:
        report = _current.get(kind)
        if report is None:
            report = _current[kind] = REPORT_KINDS[kind]()
            report.name_models = model_names
            if _out_path is not None:
                report.attach(_out_path)
        return report


def last_report(kind: str = "pave") -> Any:
    """The ``kind`` report of the merge in progress, or else of the last finished merge in this process."""
    with _lock:
        return _current.get(kind) or _last.get(kind)


def _start_output(out_path: str) -> None:
    """A merge opens its output directory: attach it to the reports (drop stale ones)."""
    global _out_path
    with _lock:
        for kind, report in list(_current.items()):
            if report.out_path is not None or report.finished:
                report.close()
                del _current[kind]
        _out_path = str(out_path)
        for report in _current.values():
            report.attach(_out_path)


def _finish_output(out_path: str | None) -> None:
    """The merge wrote its last tensor: write the final reports, log their summaries, reset."""
    global _out_path
    with _lock:
        reports = dict(_current)
        _current.clear()
        folder = out_path or _out_path
        _out_path = None
    for report in reports.values():
        if folder and not report.out_path:
            report.out_path = str(folder)
        report.finished = True
        if report.tensors:
            path = report.write()
            if report.out_path:
                _remove(Path(report.out_path) / report.partial_name)
            logger.info("%s\n%s: %s", report.summary(), report.file_name, path)
            warning = report.final_warning()
            if warning:
                logger.warning(warning)
        report.close()
    if folder:  # a report of another kind left there describes the model this merge replaced
        written = {k for k, r in reports.items() if r.tensors}
        for kind in REPORT_KINDS.keys() - written:
            _retire_stale_report(Path(folder), kind)
    with _lock:
        _last.update({k: r for k, r in reports.items() if r.tensors or k not in _last})


def _retire_stale_report(out: Path, kind: str) -> None:
    """A merge that wrote no ``kind`` report finished in ``out``: a ``kind`` report there describes
    the model this merge replaced, so it goes (with any partial one)."""
    cls = REPORT_KINDS[kind]
    _remove(out / cls().partial_name)
    stale = out / cls.file_name
    if stale.is_file() and is_rank_report(stale, REPORT_FORMATS[kind]):
        _remove(stale)
        logger.warning("%s: removed %s: it described the previous %s merge in that folder, not this merge",
                       kind, stale, kind)


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

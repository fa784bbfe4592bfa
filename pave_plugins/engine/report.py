"""Merge reports. The PAVE rank report: per weight and per model the rank kept, the full rank, the damping added
to the covariance, the relative change ``||dW_PAVE - dW||_F / ||dW||_F`` and the normalised activated
pruning error (PAVE eq. 8); per model ``rho_i = sum_l r_i^l / sum_l R^l`` (Algorithm 1, line 15).

Written as ``pave_rank_report.json`` by the mergekit ``pave`` method and by ``pave purify``.
The RegMean report (``regmean_report.json``, mergekit ``regmean``): per tensor the damping of its
Gram sum, or the rule that merged it.

Each is written once, atomically, when the output is complete; while a mergekit merge runs, its
progress goes to a hidden ``.<name>.partial.json`` beside it, so that a failed or killed merge never
replaces the report of the previous merge.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from pave_plugins import papers
from pave_plugins.io import strict_json
from pave_plugins.io.output import output_file

logger = logging.getLogger("pave_plugins")

REPORT_NAME = "pave_rank_report.json"
REGMEAN_REPORT_NAME = "regmean_report.json"
REPORT_FORMAT = "pave-rank-report"
REGMEAN_REPORT_FORMAT = "regmean-report"
_WRITE_INTERVAL_S = 5.0


class MergeReport:
    """Per-tensor records of one merge, written as JSON next to the merged weights (``file_name``);
    subclasses say what a record holds (:meth:`to_dict`) and how it is summarised (:meth:`summary`)."""

    file_name = "merge_report.json"

    @property
    def partial_name(self) -> str:
        """Where a running merge's progress goes (hidden; removed when the merge ends)."""
        return f".{Path(self.file_name).stem}.partial.json"

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.tensors: dict[str, dict[str, Any]] = {}
        self.models: list[str] = []
        self.settings: dict[str, Any] = {}
        self.out_path: str | None = None
        self.finished = False
        #: output name -> input, where a command names its outputs after its inputs (``pave purify``)
        self.outputs: dict[str, str] = {}
        #: what a face adds to the report (FusionBench: the inner method, timings, the search)
        self.extra: dict[str, Any] = {}
        #: the report names each model by ``name_models(labels)`` (mergekit: folder names, not paths)
        self.name_models: Callable[[Sequence[str]], dict[str, str]] | None = None
        self._last_write = 0.0
        # hooks run when a merge starts / ends (e.g. clearing the covariance caches)
        self.on_close: list[Callable[[], None]] = []

    def attach(self, out_path: str | os.PathLike) -> None:
        """The merge writes to ``out_path``: progress goes there (hidden, partial) from a few seconds on."""
        with self.lock:
            self.out_path = str(out_path)
            self._last_write = time.monotonic()

    # -- recording ---------------------------------------------------------------------------
    def add_tensor(
        self, name: str, record: dict[str, Any], settings: dict[str, Any], models: Sequence[str] = ()
    ) -> None:
        """Record one tensor; the models are those of ``record["models"]`` and ``models``."""
        with self.lock:
            self.settings = settings
            for model in [*record.get("models", {}), *models]:
                if model not in self.models:
                    self.models.append(model)
            self.tensors[name] = record
            if self.out_path and time.monotonic() - self._last_write > _WRITE_INTERVAL_S:
                self.write(Path(self.out_path) / self.partial_name)

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def model_names(self) -> dict[str, str]:
        """``{label: the name the written report gives that model}``."""
        names = self.name_models(self.models) if self.name_models else {}
        return {m: names.get(m, m) for m in self.models}

    def _named_tensors(self, names: dict[str, str]) -> dict[str, dict[str, Any]]:
        """The tensor records in natural name order, their per-model entries under the models' names
        (the same file whether mergekit's parallel executors finished the tensors in any order)."""
        out = {}
        for n in sorted(self.tensors, key=_natural_key):
            rec = self.tensors[n]
            out[n] = {k: ({names.get(m, m): x for m, x in v.items()} if k in _PER_MODEL and isinstance(v, dict) else v)
                      for k, v in rec.items()}
        return out

    def summary(self) -> str:
        raise NotImplementedError

    def final_warning(self) -> str | None:
        """A warning for the end of the merge (e.g. nothing was done with the covariances), or None."""
        return None

    # -- output ------------------------------------------------------------------------------
    def write(self, path: str | os.PathLike | None = None) -> Path | None:
        """Write the JSON atomically (default: ``<out_path>/<file_name>``)."""
        with self.lock:
            if path is None:
                if not self.out_path:
                    return None
                path = Path(self.out_path) / self.file_name
            path = Path(path)
            data = self.to_dict()
            with output_file(path, who="pave_plugins report") as tmp:
                tmp.write_text(strict_json.dumps(data, indent=1, default=_json_default), encoding="utf-8")
            self._last_write = time.monotonic()
            return path

    def on_close_once(self, fn: Callable[[], None]) -> bool:
        """Register ``fn`` to run at :meth:`close` unless it already is; True when newly registered
        (atomic: with mergekit's parallel executors several tensors start at once)."""
        with self.lock:
            if fn in self.on_close:
                return False
            self.on_close.append(fn)
            return True

    def close(self) -> None:
        for fn in self.on_close:
            try:
                fn()
            except Exception:  # pragma: no cover - cache clearing cannot really fail
                logger.debug("report close hook failed", exc_info=True)


class RankReport(MergeReport):
    """PAVE's rank report; see the module docstring."""

    file_name = REPORT_NAME

    # -- summaries ---------------------------------------------------------------------------
    def model_ratios(self) -> dict[str, float]:
        """Algorithm 1 line 15 over the purified tensors: ``rho_i = sum_l r_i^l / sum_l R^l``."""
        kept: dict[str, int] = {m: 0 for m in self.models}
        full: dict[str, int] = {m: 0 for m in self.models}
        for rec in self.tensors.values():
            for model, m in rec.get("models", {}).items():
                if m.get("purified"):
                    kept[model] += int(m["rank"])
                    full[model] += int(m["full_rank"])
        return {m: (kept[m] / full[m] if full[m] else None) for m in self.models}

    def to_dict(self) -> dict[str, Any]:
        """The report, models under their names (:meth:`model_names`), tensors in natural name order."""
        with self.lock:
            names = self.model_names()
            tensors = self._named_tensors(names)
            purified = [n for n, r in tensors.items() if r.get("purified")]
            plain = [n for n, r in tensors.items() if not r.get("purified")]
            return {
                "format": REPORT_FORMAT,
                "format_version": 1,
                "method": "pave",
                "paper": papers.PAVE.url,
                "settings": self.settings,
                "complete": self.finished,
                "models": [names[m] for m in self.models],
                "model_ratios": {names[m]: r for m, r in self.model_ratios().items()},
                "n_tensors": len(self.tensors),
                "n_purified": len(purified),
                "budget_not_met": [n for n in purified if not tensors[n].get("budget_met", True)],
                "plain_task_vector": plain,
                **({"outputs": dict(self.outputs)} if self.outputs else {}),
                **self.extra,
                "tensors": tensors,
            }

    def summary(self) -> str:
        d = self.to_dict()
        inner = self.settings.get("inner")
        lines = [
            f"PAVE: purified {d['n_purified']} of {d['n_tensors']} tensors "
            f"(rank allocation {self.settings.get('rank_allocation')}, rho={self.settings.get('rho')}, "
            f"target={self.settings.get('target')}" + (f", inner={inner})" if inner else ")")
        ]
        names = self.model_names()
        for model, ratio in self.model_ratios().items():
            changes = [
                m["relative_change"]
                for r in self.tensors.values()
                for mm, m in r.get("models", {}).items()
                if mm == model and m.get("purified")
            ]
            damped = sum(
                1
                for r in self.tensors.values()
                for mm, m in r.get("models", {}).items()
                if mm == model and m.get("purified") and m.get("damping", 0) > 0
            )
            if ratio is None:
                lines.append(f"  {names[model]}: nothing purified (no covariance)")
            else:
                lines.append(
                    f"  {names[model]}: rho_i={ratio:.4f}, {len(changes)} tensors, "
                    f"median ||dW_PAVE-dW||/||dW||={_median(changes):.3g}, damped covariances: {damped}"
                )
        if d["plain_task_vector"]:
            head = ", ".join(d["plain_task_vector"][:4])
            more = len(d["plain_task_vector"]) - 4
            lines.append(
                f"  plain task vector (no covariance / not 2-D): {head}" + (f" and {more} more" if more > 0 else "")
            )
        if d["budget_not_met"]:
            lines.append(f"  rank budget not met (every model at its floor gamma*R) for {len(d['budget_not_met'])} tensors")
        return "\n".join(lines)

    def final_warning(self) -> str | None:
        if not any(r.get("purified") for r in self.tensors.values()):
            return (
                "pave: no tensor was purified (no covariance matched any weight); "
                "the merge equals the inner method on the plain task vectors"
            )
        return damping_warning(self.damped())

    def damped(self) -> list[float]:
        """The relative damping (x mean diag C) of every use of a covariance damped because it is singular
        (beyond the ``damping`` asked for; the authors' rule damps by design), per tensor and model."""
        if self.settings.get("damping_rule", "relative") != "relative":
            return []
        asked = float(self.settings.get("damping", 0.0))
        return [m.get("relative_damping", 0.0) for r in self.tensors.values() for m in r.get("models", {}).values()
                if m.get("purified") and m.get("damping", 0) > 0 and m.get("relative_damping", 0.0) > asked * (1 + 1e-9)]


class RegMeanReport(MergeReport):
    """RegMean's report (``regmean_report.json``): per tensor whether RegMean merged it, the damping
    its Gram sum needed (absolute, and relative to mean diag) and the covariance keys, else the rule
    that merged it (``mean`` or ``task_arithmetic``)."""

    file_name = REGMEAN_REPORT_NAME

    def to_dict(self) -> dict[str, Any]:
        with self.lock:
            names = self.model_names()
            tensors = self._named_tensors(names)
            solved = [n for n, r in tensors.items() if r.get("regmean")]
            return {
                "format": REGMEAN_REPORT_FORMAT,
                "format_version": 1,
                "method": "regmean",
                "paper": papers.REGMEAN.url,
                "settings": self.settings,
                "complete": self.finished,
                "models": [names[m] for m in self.models],
                "n_tensors": len(self.tensors),
                "n_regmean": len(solved),
                "damped": [n for n in solved if tensors[n].get("damping", 0.0) > 0],
                "max_relative_damping": max((tensors[n]["relative_damping"] for n in solved), default=0.0),
                "not_regmean": [n for n in tensors if n not in solved],
                "tensors": tensors,
            }

    def summary(self) -> str:
        d = self.to_dict()
        lines = [
            f"RegMean: {d['n_regmean']} of {d['n_tensors']} tensors by RegMean (settings {self.settings}); "
            f"{len(d['damped'])} Gram sums damped (max damping {d['max_relative_damping']:.3g} x mean diag)"
        ]
        if d["not_regmean"]:
            head = ", ".join(d["not_regmean"][:4])
            more = len(d["not_regmean"]) - 4
            rule = self.settings.get("non_linear", "mean")
            lines.append(f"  by {rule} (no covariance / not 2-D): {head}" + (f" and {more} more" if more > 0 else ""))
        return "\n".join(lines)

    def final_warning(self) -> str | None:
        if any(r.get("regmean") for r in self.tensors.values()):
            return None
        return "regmean: no tensor had covariances (no covariance matched any weight); every tensor was averaged"


def damping_warning(relative: Sequence[float]) -> str | None:
    """The one warning of a run that damped singular covariances (each damping is logged at INFO)."""
    if not relative:
        return None
    return (f"pave: {len(relative)} singular covariances were damped (at most {max(relative):.3g} x mean diag C; "
            "expected where a task's inputs span fewer directions than the layer has: each is logged at INFO "
            "and recorded in the rank report)")


#: the entries of a tensor record keyed by model
_PER_MODEL = ("models", "covariance_keys")


def _natural_key(name: str) -> list:
    """``layers.2`` before ``layers.10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def is_rank_report(path: str | os.PathLike, report_format: str = REPORT_FORMAT) -> bool:
    """Whether ``path`` is a report of ``report_format`` (its JSON says so)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")).get("format") == report_format
    except (OSError, ValueError, AttributeError):
        return False


def _median(values: list[float]) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)

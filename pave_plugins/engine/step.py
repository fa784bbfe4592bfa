"""The per-layer PAVE step behind every face (mergekit ``pave``, ``pave purify``, FusionBench
``pave/pave``, the benchmark).

For one weight name and K fine-tuned models (PAVE paper, Sec. 3.2-3.3):

1. the covariance of each model for that layer, from its :class:`~pave_plugins.io.sources.CovarianceSource`
   (prepared once per shared input by a :class:`~pave_plugins.io.sources.PreparedCache`);
2. one context-oriented SVD per model (eq. 5, Algorithm 1 line 3), :func:`pave_plugins.core.co_svd`;
3. the ranks of the K models (Algorithm 1 or the uniform baseline) and the purified task vectors of
   eq. 6 from the same decompositions, :func:`pave_plugins.core.layer.allocate_and_purify`;
4. one :class:`LayerStep` record (ranks, damping, relative change, pruning error per model).

:meth:`PaveEngine.run` is the whole-model loop of ``pave purify``, FusionBench ``pave/pave`` and the
benchmark: every tensor through the step, covariances released after their last use, one
:class:`~pave_plugins.engine.report.RankReport`. mergekit streams tensor groups through
:meth:`PaveEngine.step` itself. The faces turn each record into their weights
(:func:`purified_weight` or :func:`purified_weight_from_tail`). Host-neutral: no host import here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, MutableSequence, Sequence

import torch
from torch import Tensor

from pave_plugins.core.layer import LayerModelError, allocate_and_purify
from pave_plugins.core.purify import CoSVD, Purification, all_finite, co_singular_values, co_svd
from pave_plugins.core.rank_allocation import allocate_ranks
from pave_plugins.io.covariance import MissingCovarianceError
from pave_plugins.io.sources import CovarianceSource, PreparedCache, lookup_key, weight_layout

from .report import RankReport
from .settings import PaveSettings

#: a face's tensors of one name: ``name -> (base weight, fine-tuned weights)``
TensorReader = Callable[[str], "tuple[Tensor, Sequence[Tensor]]"]
#: what a face does with one step's result: ``(name, step, base weight, fine-tuned weights)``
StepWriter = Callable[[str, "LayerStep", Tensor, Sequence[Tensor]], None]

logger = logging.getLogger("pave_plugins")


@dataclass
class ModelRecord:
    """What the step did to one model's weight (the report record of PAVE eq. 6-8)."""

    purified: bool
    reason: str = ""
    rank: int = 0
    full_rank: int = 0
    damping: float = 0.0
    relative_damping: float = 0.0
    relative_change: float = 0.0  # ||dW_PAVE - dW||_F / ||dW||_F
    pruning_error: float = 0.0  # normalised activated pruning error, eq. 8
    covariance_key: str | None = None

    def to_dict(self) -> dict:
        if not self.purified:
            return {"purified": False, "reason": self.reason}
        return {
            "purified": True,
            "rank": self.rank,
            "full_rank": self.full_rank,
            "damping": self.damping,
            "relative_damping": self.relative_damping,
            "relative_change": self.relative_change,
            "pruning_error": self.pruning_error,
            "covariance_key": self.covariance_key,
        }


@dataclass
class LayerStep:
    """Result of the step for one weight name: per-model records and purifications (``None``: kept)."""

    name: str
    labels: list[str]
    models: list[ModelRecord]
    purifications: list[Purification | None] = field(default_factory=list)
    full_rank: int = 0
    budget_met: bool = True

    @property
    def purified(self) -> bool:
        return any(m.purified for m in self.models)

    def to_dict(self) -> dict:
        """The rank-report record of this weight (``pave_rank_report.json``)."""
        models = {lab: m.to_dict() for lab, m in zip(self.labels, self.models)}
        if not self.purified:
            return {"purified": False, "models": models}
        return {"purified": True, "full_rank": self.full_rank, "budget_met": self.budget_met, "models": models}


def purified_weight(w_base: Tensor, purification: Purification, like: Tensor) -> Tensor:
    """``W_base + dW_PAVE`` (eq. 6) in ``like``'s dtype: what a checkpoint holding it gives any merge."""
    tv = purification.task_vector
    return (w_base.to(tv.dtype) + tv).to(like.dtype)


def purified_weight_from_tail(w_ft: Tensor, tail_left: Tensor, tail_right: Tensor, like: Tensor) -> Tensor:
    """``W_ft - U_{>r} (U_{>r}^T A)`` (eq. 6 in residual form: only the low-rank tail of a
    :class:`~pave_plugins.core.Purification`) on ``like``'s device and dtype; used where the
    fine-tuned weight is overwritten in place."""
    left = tail_left
    return (w_ft.to(device=left.device, dtype=left.dtype) - left @ tail_right).to(device=like.device, dtype=like.dtype)


def transposed_purification(p: Purification) -> Purification:
    """``p`` for the transposed weight: ``(dW - L R)^T = dW^T - R^T L^T``."""
    return replace(p, task_vector=p.task_vector.T, tail_left=p.tail_right.T, tail_right=p.tail_left.T)


def check_shapes(name: str, w_base: Tensor, w_fts: Sequence[Tensor], labels: Sequence[str]) -> None:
    """Every fine-tuned tensor has the base's shape (else the models are of different architectures)."""
    for lab, t in zip(labels, w_fts):
        if t.shape != w_base.shape:
            raise ValueError(f"{name}: {lab} has shape {tuple(t.shape)}, base {tuple(w_base.shape)}")


class CoSVDStore:
    """CO-SVDs kept across runs of one set of models (the benchmark runs PAVE at several ``rho``):
    per (model, tensor, target, damping) only ``U`` and ``S``; ``W_ft`` and ``dW`` are rebuilt when used."""

    def __init__(self) -> None:
        self.decompositions: dict[tuple, CoSVD] = {}


def check_finite_weights(name: str, w_base: Tensor | None, w_fts: Sequence[Tensor], labels: Sequence[str]) -> None:
    """Never merge NaN or Inf: a one-line error naming the tensor and the model (``w_base`` may be None)."""
    pairs = ([("base model", w_base)] if w_base is not None else []) + list(zip(labels, w_fts))
    for lab, t in pairs:
        if not all_finite(t):
            raise ValueError(f"{name}: the weight of {lab} contains NaN or Inf")


def full_rank_indices(names: Sequence[str], labels: Sequence[str]) -> frozenset[int]:
    """The models ``full_rank_models`` names, each by its label or folder name; a name that is none
    of the models is an error (a typo would silently purify the model it meant)."""
    found: set[int] = set()
    for wanted in names:
        hits = [i for i, lab in enumerate(labels) if wanted in (lab, Path(lab).name)]
        if not hits:
            raise ValueError(f"full_rank_models: {wanted!r} is none of the models {list(labels)}")
        found.update(hits)
    return frozenset(found)


def model_granularity_ranks(ratios: Sequence[float], full_rank: int) -> list[int]:
    """Each model's rank at a layer of ``full_rank`` under ``rank_granularity: model``:
    ``max(1, round(rho_i R))``, as the authors' code cuts every layer of model i."""
    return [min(full_rank, max(1, round(ratio * full_rank))) for ratio in ratios]


def _release_after(last_use: dict[int, dict[str, int]], name: str, index: int) -> Callable[[int], bool]:
    """``release(i)``: whether tensor ``name`` at ``index`` is the last to read model i's covariance."""
    return lambda i: last_use.get(i, {}).get(name) == index


class PaveEngine:
    """PAVE for K models whose covariances come from ``sources`` (``None``: that model has none).

    ``labels`` name the models in errors and records; ``device``: where the maths runs (default:
    each fine-tuned weight's device).
    """

    def __init__(
        self,
        settings: PaveSettings,
        sources: Sequence[CovarianceSource | None],
        labels: Sequence[str],
        *,
        cache: PreparedCache | None = None,
        device: torch.device | str | None = None,
        store: CoSVDStore | None = None,
    ) -> None:
        if len(sources) != len(labels):
            raise ValueError(f"{len(sources)} covariance sources for {len(labels)} models")
        self.settings = settings
        self.sources = list(sources)
        self.labels = list(labels)
        self.cache = cache if cache is not None else PreparedCache()
        self.device = device
        self.store = store
        self.kept = full_rank_indices(settings.full_rank_models, self.labels)
        #: Algorithm 1 line 15 per model, for ``rank_granularity: model`` (:meth:`rank_ratios`)
        self.model_ratios: list[float] | None = None

    # ------------------------------------------------------------------ the whole step
    def step(
        self, name: str, w_base: Tensor, w_fts: Sequence[Tensor], *, release: Callable[[int], bool] | None = None
    ) -> LayerStep:
        """Purify one weight name of the K models (any tensor: only 2-D ones with covariances change);
        ``release(i)`` true drops model i's prepared covariances once used (see :meth:`decompose`)."""
        keys = self.gate(name, w_base, w_fts)
        if isinstance(keys, LayerStep):
            return keys
        if not self.stored_in_out(name, keys):
            return self.finish(name, self.decompose(name, w_base, w_fts, keys, release=release), keys)
        # GPT-2 Conv1D: y = x W with W stored in x out; eq. 5-6 act on the out x in matrix W^T
        step = self.finish(name, self.decompose(name, w_base.T, [w.T for w in w_fts], keys, release=release), keys)
        step.purifications = [transposed_purification(p) if p is not None else None for p in step.purifications]
        return step

    def gate(self, name: str, w_base: Tensor, w_fts: Sequence[Tensor]) -> list[str | None] | LayerStep:
        """The checks of every tensor (shapes, finiteness, the missing-covariance rule): the covariance
        key of each model to purify (``None``: not purified), or the step of a tensor left as it is."""
        check_shapes(name, w_base, w_fts, self.labels)
        self.check_finite(name, w_base, w_fts)
        if w_base.ndim != 2:
            reason = f"not a 2-D weight ({w_base.ndim}-D)"
            return LayerStep(name, self.labels, [ModelRecord(False, reason) for _ in self.labels])
        keys = self.keys(name) if w_base.is_floating_point() else [None] * len(self.labels)
        if not self.models_to_purify(name, keys):
            return self.unpurified(name, keys)
        return [None if i in self.kept else k for i, k in enumerate(keys)]

    def run(
        self,
        names: Sequence[str],
        read: TensorReader,
        write: StepWriter,
        *,
        report: RankReport | None = None,
        record: dict[str, Any] | None = None,
        progress: str | None = None,
    ) -> RankReport:
        """PAVE over a whole model: each tensor of ``names`` (in that order) read, stepped
        (:meth:`step`: finiteness, missing-covariance rule, eq. 5-6, Algorithm 1) and handed to
        ``write``; each model's prepared covariance is released after the last tensor that reads it.
        Returns the rank report (``record``: the settings it names; default :meth:`PaveSettings.to_dict`),
        not yet marked complete: the face does that once its output is."""
        from tqdm.auto import tqdm

        report = report if report is not None else RankReport()
        record = record if record is not None else self.settings.to_dict()
        last_use = self._last_uses(names)
        if self.settings.rank_granularity == "model":
            self.model_ratios = self.rank_ratios(names, read, last_use, progress=progress)
            report.extra["algorithm_1_model_ratios"] = dict(zip(self.labels, self.model_ratios))
        for index, name in enumerate(tqdm(names, desc=progress, unit="tensor", disable=progress is None)):
            w_base, w_fts = read(name)
            step = self.step(name, w_base, w_fts, release=_release_after(last_use, name, index))
            if w_base.is_floating_point():  # integer buffers are copied, not reported
                report.add_tensor(name, step.to_dict(), record, self.labels)
            write(name, step, w_base, w_fts)
            del w_base, w_fts, step
        return report

    def rank_ratios(self, names: Sequence[str], read: TensorReader, last_use: dict[int, dict[str, int]] | None = None,
                    *, progress: str | None = None) -> list[float]:
        """Algorithm 1 over the whole model, then line 15: ``rho_i = sum_l r_i^l / sum_l R^l`` per model
        (layers where model i is ranked), from the singular values alone (a first pass over ``names``)."""
        from tqdm.auto import tqdm

        last_use = last_use if last_use is not None else self._last_uses(names)
        kept, full = [0] * len(self.labels), [0] * len(self.labels)
        s = self.settings
        desc = f"{progress}: ranks" if progress is not None else None
        for index, name in enumerate(tqdm(names, desc=desc, unit="tensor", disable=progress is None)):
            w_base, w_fts = read(name)
            keys = self.gate(name, w_base, w_fts)
            if isinstance(keys, LayerStep) or not any(k is not None for k in keys):
                continue
            svals = self.singular_values(name, w_base, w_fts, keys, release=_release_after(last_use, name, index))
            todo = [i for i, v in enumerate(svals) if v is not None]
            alloc = allocate_ranks({name: [svals[i] for i in todo]}, s.rho, s.resolved_gamma, method=s.rank_allocation)
            for i, r in zip(todo, alloc.ranks[name]):
                kept[i] += r
                full[i] += alloc.full_ranks[name]
        return [k / f if f else 1.0 for k, f in zip(kept, full)]

    def singular_values(self, name: str, w_base: Tensor, w_fts: Sequence[Tensor], keys: Sequence[str | None], *,
                        release: Callable[[int], bool] | None = None) -> list[Tensor | None]:
        """The sigma of Algorithm 1 line 3 per model with a key (eq. 5's SVD without its vectors)."""
        if self.stored_in_out(name, keys):
            w_base, w_fts = w_base.T, [w.T for w in w_fts]
        stored = [self.store.decompositions.get(self._store_key(i, name)) if self.store else None
                  for i in range(len(keys))]
        todo = [k if d is None else None for k, d in zip(keys, stored)]  # what the store has is not recomputed
        fresh = self._fresh_decompositions(name, w_base, w_fts, todo, release, compute=co_singular_values)
        return [d.s if d is not None and k is not None else v for k, d, v in zip(keys, stored, fresh)]

    def _last_uses(self, names: Sequence[str]) -> dict[int, dict[str, int]]:
        """Per model, per tensor name: the index of the last name reading the same covariance."""
        last: dict[int, dict[str, int]] = {}
        for i, source in enumerate(self.sources):
            by_key: dict[str, int] = {}
            keys = [lookup_key(source, n) for n in names]
            for index, key in enumerate(keys):
                if key is not None:
                    by_key[key] = index
            last[i] = {n: by_key[k] for n, k in zip(names, keys) if k is not None}
        return last

    def check_finite(self, name: str, w_base: Tensor, w_fts: Sequence[Tensor]) -> None:
        """Never merge NaN or Inf (also in tensors that are not purified: norms, embeddings)."""
        check_finite_weights(name, w_base, w_fts, self.labels)

    def keys(self, name: str) -> list[str | None]:
        """Covariance key of ``name`` in each model's source (``None``: that model has none)."""
        return [lookup_key(s, name) for s in self.sources]

    def stored_in_out(self, name: str, keys: Sequence[str | None]) -> bool:
        """Whether ``name`` is stored ``in x out`` (GPT-2 Conv1D), as the covariance sources record it;
        sources that disagree are an error (the covariances were collected on different architectures)."""
        layouts = {weight_layout(s, name) for s, k in zip(self.sources, keys) if k is not None}
        if len(layouts - {None}) > 1:
            raise ValueError(f"{name}: the covariance files disagree on its weight layout (in x out or out x in)")
        return "in_out" in layouts

    def models_to_purify(self, name: str, keys: Sequence[str | None]) -> list[int]:
        """Models with a covariance for ``name``; models lacking one while others have one are an
        error unless ``allow_missing_covariance`` (then they keep their plain task vector)."""
        todo = [i for i, k in enumerate(keys) if k is not None and i not in self.kept]
        lacking = [i for i, k in enumerate(keys) if k is None and i not in self.kept]
        if todo and lacking:
            what = [f"{self.labels[i]} ({self._origin(i)})" for i in lacking]
            if not self.settings.allow_missing_covariance:
                raise MissingCovarianceError(
                    f"{name}: missing covariance for model(s) {what}, while model(s) "
                    f"{[self.labels[i] for i in todo]} have one for this layer; give covariance files that cover "
                    "it, or set allow_missing_covariance (pave purify: --allow-missing-covariance) to keep the "
                    "plain task vector of the models without one"
                )
            logger.warning("pave: %s: no covariance for model(s) %s; their plain task vector is kept", name, what)
        return todo

    def unpurified(self, name: str, keys: Sequence[str | None]) -> LayerStep:
        return LayerStep(name, self.labels, [ModelRecord(False, self._reason(i)) for i in range(len(keys))])

    def _reason(self, i: int) -> str:
        return "kept at full rank (full_rank_models)" if i in self.kept else "no covariance for this layer"

    # ------------------------------------------------------------------ the two halves
    def decompose(
        self,
        name: str,
        w_base: Tensor,
        w_fts: Sequence[Tensor],
        keys: Sequence[str | None],
        *,
        release: Callable[[int], bool] | None = None,
    ) -> list[CoSVD | None]:
        """One CO-SVD per model with a key (eq. 5), one model at a time; ``release(i)`` true drops
        model i's prepared covariances right after its decomposition (the next layer reads another input)."""
        if self.store is not None:
            return self._stored_decompositions(name, w_base, w_fts, keys, release)
        return self._fresh_decompositions(name, w_base, w_fts, keys, release)

    def _fresh_decompositions(self, name, w_base, w_fts, keys, release, compute: Callable = co_svd) -> list:
        """``compute`` (eq. 5's :func:`~pave_plugins.core.purify.co_svd`, or its singular values
        alone) per model with a key, one model at a time, on its prepared covariance."""
        dtype = self.settings.dtype
        out: list = []
        for i, (w_ft, key) in enumerate(zip(w_fts, keys)):
            if key is None:
                out.append(None)
                continue
            device = self.device if self.device is not None else w_ft.device
            prepared, _ = self.cache.get(self.sources[i], name, device=device, compute_dtype=dtype,  # type: ignore[arg-type]
                                         damping=self.settings.damping_spec)
            try:
                out.append(
                    compute(w_ft.to(device), w_base.to(device), prepared, target=self.settings.target,
                            compute_dtype=dtype, name=f"{name} of model {self.labels[i]}")
                )
            except ValueError as exc:
                raise self._model_error(LayerModelError(str(exc), i), keys) from exc
            del prepared
            if release is not None and release(i):
                self.cache.release(self.sources[i])  # type: ignore[arg-type]
        return out

    def _stored_decompositions(self, name, w_base, w_fts, keys, release) -> list[CoSVD | None]:
        """:meth:`decompose` through :attr:`store`: models seen before reuse their ``U``, ``S``."""
        assert self.store is not None
        stored = self.store.decompositions
        todo = [key if self._store_key(i, name) not in stored else None for i, key in enumerate(keys)]
        fresh = self._fresh_decompositions(name, w_base, w_fts, todo, release)
        for i, d in enumerate(fresh):
            if d is not None:
                stored[self._store_key(i, name)] = replace(d, delta=None, w_ft=None)
        base = w_base.to(self.settings.dtype)
        out: list[CoSVD | None] = []
        for i, (w_ft, key) in enumerate(zip(w_fts, keys)):
            ft = w_ft.to(self.settings.dtype)
            out.append(replace(stored[self._store_key(i, name)], w_ft=ft, delta=ft - base) if key is not None else None)
        return out

    def _store_key(self, i: int, name: str) -> tuple:
        """A stored CO-SVD depends on the model, the tensor, the target and the damping of ``C``."""
        return (i, name, self.settings.target, self.settings.damping_spec)

    def finish(self, name: str, cosvds: MutableSequence[CoSVD | None], keys: Sequence[str | None]) -> LayerStep:
        """Ranks (Algorithm 1 / uniform) and purified task vectors (eq. 6) from the CO-SVDs; each
        decomposition is released once used."""
        s = self.settings
        layer = allocate_and_purify(cosvds, rho=s.rho, gamma=s.resolved_gamma, allocation=s.rank_allocation,
                                    names=[f"{name} of model {lab}" for lab in self.labels], name=name, release=True,
                                    ranks=self._fixed_ranks(cosvds))
        records = []
        for i, p in enumerate(layer.purifications):
            if p is None:
                records.append(ModelRecord(False, self._reason(i)))
                continue
            records.append(ModelRecord(
                True, rank=p.rank, full_rank=p.full_rank, damping=p.damping,
                relative_damping=p.relative_damping, relative_change=p.relative_change,
                pruning_error=p.pruning_error, covariance_key=keys[i],
            ))
        return LayerStep(name, self.labels, records, layer.purifications, layer.full_rank, layer.budget_met)

    def _fixed_ranks(self, cosvds: Sequence[CoSVD | None]) -> list[int] | None:
        """``rank_granularity: model``: the ranks from each model's ratio (``None``: Algorithm 1 per layer)."""
        if self.settings.rank_granularity != "model":
            return None
        if self.model_ratios is None:
            raise RuntimeError("rank_granularity 'model' needs the models' ratios first (PaveEngine.rank_ratios)")
        full = next(d.full_rank for d in cosvds if d is not None)
        return model_granularity_ranks(self.model_ratios, full)

    # ------------------------------------------------------------------ helpers
    def _origin(self, i: int) -> str:
        src = self.sources[i]
        return src.origin if src is not None else "no covariance file given"

    def _model_error(self, exc: LayerModelError, keys: Sequence[str | None]) -> ValueError:
        i = exc.model_index
        src = self.sources[i]
        where = f" (covariance {keys[i]!r} in {src.origin})" if src is not None else ""
        hint = "; was the covariance collected for another model?" if "covariance is" in str(exc) else ""
        return ValueError(f"{exc}{where}{hint}")

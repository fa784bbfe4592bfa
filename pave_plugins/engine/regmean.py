"""The host-neutral RegMean step (arXiv 2212.09849) on the covariance files of ``pave collect``.

A covariance file holds, per layer input, ``X^T X`` summed over the tokens a fine-tuned model saw:
exactly RegMean's Gram matrix. For one tensor name and K fine-tuned models the step

1. looks up each model's covariance key for the layer (q/k/v and gate/up share one input, hence one
   key) in its :class:`~pave_plugins.io.sources.CovarianceSource`;
2. builds ``G~_i`` (weighting, off-diagonal scale) and their prepared sum ``sum_i G~_i`` (validated,
   damped if singular) once per shared input, through a :class:`~pave_plugins.io.sources.PreparedCache`
   over a :class:`GramSum` source;
3. solves RegMean's closed form (:func:`pave_plugins.core.regmean.regmean_solve`); tensors that are
   not linear weights with covariances take :func:`pave_plugins.core.regmean.merge_non_linear`.

The faces (mergekit ``regmean``, FusionBench ``pave/regmean``, the benchmark) build one
:class:`RegMeanSettings` and call :meth:`RegMeanEngine.step` per tensor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
from torch import Tensor

from pave_plugins import papers
from pave_plugins.core.purify import validated_covariance
from pave_plugins.core.regmean import (
    GRAM_WEIGHTINGS,
    NON_LINEAR_RULES,
    check_non_diagonal_ratio,
    merge_non_linear,
    regmean_grams,
    regmean_solve,
)
from pave_plugins.io.covariance import CovarianceFileError, MissingCovarianceError
from pave_plugins.io.sources import (
    FINGERPRINT_POLICIES,
    CovarianceSource,
    PreparedCache,
    lookup_key,
    token_count,
    weight_layout,
)

from .settings import COMPUTE_DTYPES, check_table, compute_dtype_name, setting
from .step import check_finite_weights

logger = logging.getLogger("pave_plugins")

REGMEAN_URL = papers.REGMEAN.url


@dataclass(frozen=True)
class RegMeanSettings:
    """RegMean's parameters: ``reduce_non_diagonal_ratio`` (``a`` of Sec. 3.3, in [0, 1]; 1 is the
    closed form), ``gram_weighting`` (``sum``: the paper; ``mean``: each Gram divided by its token
    count, as FusionBench), ``non_linear`` (``mean``: the paper; ``task_arithmetic``: base +
    ``scaling_factor`` x sum of task vectors, needs the base model) and ``compute_dtype``."""

    reduce_non_diagonal_ratio: float = setting(
        1.0, "a of RegMean Sec. 3.3: off-diagonal Gram entries scaled by a, in [0, 1]; 1 is the closed form",
        check=check_non_diagonal_ratio)
    gram_weighting: str = setting("sum", "sum: Grams as collected (the paper); mean: each divided by its token "
                                  "count (FusionBench)", choices=GRAM_WEIGHTINGS)
    non_linear: str = setting("mean", "entries RegMean does not regress: mean (the paper) or task_arithmetic",
                              choices=NON_LINEAR_RULES)
    scaling_factor: float = setting(1.0, "task_arithmetic only: base + scaling_factor x sum of task vectors",
                                    face_names={"mergekit": "lambda"})
    compute_dtype: str = setting("float64", "dtype of the maths", choices=tuple(COMPUTE_DTYPES))
    on_fingerprint_mismatch: str = setting(
        "warn", "a covariance collected on other weights of the same shapes: error, warn (default: a face may "
        "hold a re-saved or LoRA-merged copy of the model) or ignore", choices=FINGERPRINT_POLICIES)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compute_dtype", compute_dtype_name(self.compute_dtype))
        check_table(self)

    @property
    def dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.compute_dtype]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class GramSum:
    """The K models' Grams of a layer seen as one covariance source whose covariance is ``sum_i G~_i``.

    Lets :class:`~pave_plugins.io.sources.PreparedCache` validate, damp and cache the sum once per
    shared input; :meth:`grams` keeps the ``G~_i`` of the last input for the right-hand side.
    """

    def __init__(self, sources: Sequence[CovarianceSource], labels: Sequence[str], settings: RegMeanSettings):
        self.sources, self.labels, self.settings = list(sources), list(labels), settings
        self._memo: tuple[tuple, list[Tensor]] | None = None

    @property
    def origin(self) -> str:
        return "RegMean Gram sum of " + ", ".join(f"{lab} ({s.origin})" for lab, s in zip(self.labels, self.sources))

    @property
    def layers(self) -> list[str]:
        return sorted(set.intersection(*(set(s.layers) for s in self.sources)))

    @property
    def fingerprint(self) -> str:
        return ""

    @property
    def layer_info(self) -> dict:
        return self.sources[0].layer_info

    def resolve(self, name: str) -> str | None:
        return self.sources[0].resolve(name) if all(s.resolve(name) for s in self.sources) else None

    def key_for(self, name: str) -> str:
        return "+".join(s.key_for(name) for s in self.sources)

    def key_sizes(self) -> dict[str, int]:
        return {}

    def grams(self, name: str, *, device: torch.device | str | None = None) -> list[Tensor]:
        """``G~_i`` of every model for ``name`` (compute dtype, on ``device``)."""
        memo_key = (self.key_for(name), str(device))
        if self._memo is not None and self._memo[0] == memo_key:
            return self._memo[1]
        keys = [s.key_for(name) for s in self.sources]
        raw = [s.get(name, device=device) for s in self.sources]
        for s, k, g in zip(self.sources, keys, raw):  # name the file of a bad matrix (the sum cannot)
            where = f"covariance {k!r} (layer {name!r}) in {s.origin}"
            if g.shape != raw[0].shape:
                raise CovarianceFileError(f"{where}: shape {tuple(g.shape)}, the other models have {tuple(raw[0].shape)}")
            try:  # each model's matrix as a covariance must be: the sum can hide an indefinite one
                validated_covariance(g, compute_dtype=g.dtype, semidefinite="fast", name=where)
            except ValueError as exc:
                raise CovarianceFileError(str(exc)) from None
        grams = regmean_grams(
            raw,
            ratio=self.settings.reduce_non_diagonal_ratio,
            token_counts=[token_count(s, k) for s, k in zip(self.sources, keys)],
            gram_weighting=self.settings.gram_weighting,
            compute_dtype=self.settings.dtype,
            name=f"{name} (covariances {keys} in {[s.origin for s in self.sources]})",
        )
        self._memo = (memo_key, grams)
        return grams

    def get(self, name: str, *, device: torch.device | str | None = None) -> Tensor:
        grams = self.grams(name, device=device)
        total = grams[0].clone()
        for g in grams[1:]:
            total += g
        return total


class RegMeanEngine:
    """RegMean for K models whose covariances come from ``sources`` (``None``: that model has none)."""

    def __init__(
        self,
        settings: RegMeanSettings,
        sources: Sequence[CovarianceSource | None],
        labels: Sequence[str],
        *,
        cache: PreparedCache | None = None,
    ) -> None:
        if len(sources) != len(labels):
            raise ValueError(f"{len(sources)} covariance sources for {len(labels)} models")
        self.settings, self.sources, self.labels = settings, list(sources), list(labels)
        self.cache = cache if cache is not None else PreparedCache()
        have = [s for s in self.sources if s is not None]
        self.grams = GramSum(have, labels, settings) if len(have) == len(self.sources) and have else None

    def keys(self, name: str) -> list[str | None]:
        """Each model's covariance key for ``name``; some models having one and others not is an error."""
        keys = [lookup_key(s, name) for s in self.sources]
        lacking = [f"{lab} ({s.origin if s is not None else 'no covariance file'})"
                   for lab, s, k in zip(self.labels, self.sources, keys) if k is None]
        if lacking and len(lacking) < len(keys):
            raise MissingCovarianceError(
                f"{name}: RegMean needs a covariance of this layer for every model; missing for {lacking}"
            )
        return keys

    def step(self, name: str, w_fts: Sequence[Tensor], w_base: Tensor | None = None) -> tuple[Tensor, dict]:
        """Merge one tensor of the K models: RegMean for linear weights with covariances, else the
        non-linear rule. Returns the merged tensor (dtype and device of ``w_fts[0]``) and its record."""
        check_finite_weights(name, w_base, w_fts, self.labels)
        s = self.settings
        first = w_fts[0]
        keys = self.keys(name) if first.ndim == 2 and first.is_floating_point() else [None]
        if self.grams is None or keys[0] is None:
            merged = merge_non_linear(w_fts, rule=s.non_linear, base=w_base, scaling_factor=s.scaling_factor, name=name)
            reason = "no covariance for this tensor" if first.ndim == 2 else f"not a 2-D weight ({first.ndim}-D)"
            return merged, {"regmean": False, "merged_by": s.non_linear, "reason": reason}
        transpose = weight_layout(self.grams, name) == "in_out"
        prepared, key = self.cache.get(self.grams, name, device=first.device, compute_dtype=s.dtype, keep_factor=True)
        weights = [w.T if transpose else w for w in w_fts]
        try:
            sol = regmean_solve(weights, self.grams.grams(name, device=first.device), prepared, name=name)
        except ValueError as exc:
            raise ValueError(f"{exc} (covariances {key!r} in {self.grams.origin})") from exc
        merged = sol.weight.T if transpose else sol.weight
        record = {
            "regmean": True,
            "damping": sol.damping,
            "relative_damping": sol.relative_damping,
            "covariance_keys": dict(zip(self.labels, keys)),
        }
        if sol.damping > 0:
            logger.debug("regmean: %s: Gram sum singular, damped with %.3g", name, sol.damping)
        return merged.contiguous(), record

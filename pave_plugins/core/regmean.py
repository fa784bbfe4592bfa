"""RegMean: merging linear layers by regression on their inputs (Jin et al., "Dataless Knowledge
Fusion by Merging Weights of Language Models", ICLR 2023, arXiv 2212.09849).

Notation as in PAVE's modules: a linear layer computes ``y = W x`` with ``W`` of shape
``out x in``; model i saw the inputs ``X_i`` (``N_i x in``, one row per token) and ``G_i = X_i^T X_i``
(``in x in``) is the Gram matrix a covariance file stores (PAVE's ``C``).

RegMean (Sec. 3.2, merging linear models) picks the merged weight that reproduces every model's
outputs on that model's own inputs, ``min_W sum_i ||X_i W^T - X_i W_i^T||_F^2``, whose closed form is

    W^T = (sum_i G_i)^{-1} sum_i G_i W_i^T.

For transformers (Sec. 3.3) the off-diagonal entries of each Gram are scaled by ``a`` in [0, 1]
(FusionBench: ``reduce_non_diagonal_ratio``): ``G~_i = a G_i + (1 - a) diag(G_i)``; ``a = 1`` is
the closed form above, ``a = 0`` a per-input-feature weighted average. Parameters that are not
linear weights take the simple average (the paper) or task arithmetic (an option here).

How it is computed. ``sum_i G~_i`` is validated and, when singular, damped exactly as PAVE damps a
covariance (:func:`pave_plugins.core.purify.prepare_covariance`: a positive diagonal ``d``, doubled
from ``1e-10 mean(diag)`` until a Cholesky factorisation succeeds; reported, refused above
``mean(diag)``); then the system is solved with that Cholesky factor in float64 (default), never
with an explicit inverse. With damping the solved problem is the ridge regression towards the mean
weight ``W_bar``: ``(sum_i G~_i + d I) W^T = sum_i G~_i W_i^T + d W_bar^T``, so identical models
merge to themselves and input directions that no model's data reaches take the simple average.

Gram weighting: ``sum`` (the paper: a model whose Gram counts more tokens weighs more) or ``mean``
(FusionBench: each Gram divided by its token count first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

from .purify import PreparedCovariance, all_finite, prepare_covariance

GramWeighting = Literal["sum", "mean"]
GRAM_WEIGHTINGS: tuple[str, ...] = ("sum", "mean")
NonLinear = Literal["mean", "task_arithmetic"]
NON_LINEAR_RULES: tuple[str, ...] = ("mean", "task_arithmetic")


def check_non_diagonal_ratio(ratio: float) -> float:
    """The off-diagonal scale ``a`` of Sec. 3.3: a finite number in [0, 1]."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"reduce_non_diagonal_ratio must be a number in [0, 1], got {ratio!r}")
    return float(ratio)


def reduce_non_diagonal(gram: Tensor, ratio: float) -> Tensor:
    """``G~ = a G + (1 - a) diag(G)`` (Sec. 3.3): off-diagonal entries scaled by ``a``, diagonal kept."""
    if ratio == 1.0:
        return gram
    out = gram * ratio
    out.diagonal().copy_(gram.diagonal())
    return out


def weighted_gram(gram: Tensor, tokens: int | None, weighting: str, *, name: str = "Gram matrix") -> Tensor:
    """``G`` (``sum``, the paper) or ``G / tokens`` (``mean``, FusionBench's per-token average)."""
    if weighting not in GRAM_WEIGHTINGS:
        raise ValueError(f"gram_weighting must be one of {GRAM_WEIGHTINGS}, got {weighting!r}")
    if weighting == "sum":
        return gram
    if tokens is None or int(tokens) <= 0:
        raise ValueError(f"{name}: gram_weighting 'mean' needs its token count, got {tokens!r}")
    return gram / int(tokens)


def regmean_grams(
    grams: Sequence[Tensor],
    *,
    ratio: float = 1.0,
    token_counts: Sequence[int | None] | None = None,
    gram_weighting: str = "sum",
    compute_dtype: torch.dtype = torch.float64,
    name: str = "weight",
) -> list[Tensor]:
    """The K Grams of one layer as RegMean uses them: weighted, then ``G~_i`` (compute dtype)."""
    ratio = check_non_diagonal_ratio(ratio)
    counts = list(token_counts) if token_counts is not None else [None] * len(grams)
    if len(counts) != len(grams):
        raise ValueError(f"{name}: {len(counts)} token counts for {len(grams)} Gram matrices")
    out = []
    for i, (g, n) in enumerate(zip(grams, counts)):
        if g.ndim != 2 or g.shape[0] != g.shape[1]:
            raise ValueError(f"{name}: Gram matrix of model {i} must be square, got shape {tuple(g.shape)}")
        g = weighted_gram(g.to(compute_dtype), n, gram_weighting, name=f"{name}, model {i}")
        out.append(reduce_non_diagonal(g, ratio))
    return out


def prepare_gram_sum(grams: Sequence[Tensor], *, name: str = "weight") -> PreparedCovariance:
    """``sum_i G~_i``, validated and damped until Cholesky succeeds (PAVE's covariance damping), with
    its Cholesky factor."""
    if not grams:
        raise ValueError(f"{name}: RegMean needs at least one Gram matrix")
    total = grams[0].clone()
    for g in grams[1:]:
        total += g
    return prepare_covariance(total, compute_dtype=total.dtype, name=f"RegMean Gram sum of {name}", keep_factor=True)


@dataclass(frozen=True)
class RegMeanSolution:
    """The merged weight (``out x in``, in the first weight's dtype) and the damping that was needed."""

    weight: Tensor
    damping: float
    relative_damping: float  # damping / mean(diag sum_i G~_i)


def regmean_solve(
    weights: Sequence[Tensor], grams: Sequence[Tensor], gram_sum: PreparedCovariance, *, name: str = "weight"
) -> RegMeanSolution:
    """``W^T = (sum_i G~_i + d I)^{-1} (sum_i G~_i W_i^T + d W_bar^T)`` by a Cholesky solve.

    ``grams`` are the ``G~_i`` of :func:`regmean_grams` and ``gram_sum`` their prepared sum
    (:func:`prepare_gram_sum`, which chose the damping ``d``; ``d = 0`` is RegMean's closed form).
    """
    if len(weights) != len(grams) or not weights:
        raise ValueError(f"{name}: {len(weights)} weights for {len(grams)} Gram matrices")
    matrix = gram_sum.matrix
    shape = weights[0].shape
    for i, w in enumerate(weights):
        if w.ndim != 2 or w.shape != shape:
            raise ValueError(f"{name}: weight of model {i} has shape {tuple(w.shape)}, expected {tuple(shape)}")
        if w.shape[1] != matrix.shape[0]:
            raise ValueError(
                f"{name}: the weight has {w.shape[1]} inputs but the Gram matrices are "
                f"{tuple(matrix.shape)}; were they collected for another model?"
            )
    ws = [w.to(device=matrix.device, dtype=matrix.dtype) for w in weights]
    for i, w in enumerate(ws):
        if not all_finite(w):
            raise ValueError(f"{name}: weight of model {i} contains NaN or Inf")
    rhs = sum(g @ w.T for g, w in zip(grams, ws))  # in x out
    if gram_sum.damping > 0.0:
        rhs = rhs + (gram_sum.damping / len(ws)) * sum(w.T for w in ws)
    factor = gram_sum.factor if gram_sum.factor is not None else torch.linalg.cholesky(matrix)
    merged_t = torch.cholesky_solve(rhs, factor)
    return RegMeanSolution(
        weight=merged_t.T.to(weights[0].dtype),
        damping=gram_sum.damping,
        relative_damping=gram_sum.relative_damping,
    )


def regmean_merge(
    weights: Sequence[Tensor],
    grams: Sequence[Tensor],
    *,
    ratio: float = 1.0,
    token_counts: Sequence[int | None] | None = None,
    gram_weighting: str = "sum",
    compute_dtype: torch.dtype = torch.float64,
    name: str = "weight",
) -> RegMeanSolution:
    """RegMean for one linear layer: K weights (``out x in``) and their K Grams (``in x in``)."""
    device = weights[0].device if weights else None
    reduced = regmean_grams(
        [g.to(device) for g in grams], ratio=ratio, token_counts=token_counts, gram_weighting=gram_weighting,
        compute_dtype=compute_dtype, name=name,
    )
    return regmean_solve(weights, reduced, prepare_gram_sum(reduced, name=name), name=name)


def merge_non_linear(
    weights: Sequence[Tensor],
    *,
    rule: str = "mean",
    base: Tensor | None = None,
    scaling_factor: float = 1.0,
    name: str = "weight",
) -> Tensor:
    """Parameters RegMean does not regress: ``mean_i W_i`` (the paper) or task arithmetic,
    ``W_base + scaling_factor * sum_i (W_i - W_base)``; in the first weight's dtype."""
    if rule not in NON_LINEAR_RULES:
        raise ValueError(f"non_linear must be one of {NON_LINEAR_RULES}, got {rule!r}")
    if not weights:
        raise ValueError(f"{name}: nothing to merge")
    if not math.isfinite(float(scaling_factor)):
        raise ValueError(f"scaling_factor must be a finite number, got {scaling_factor!r}")
    out_dtype = weights[0].dtype
    if not out_dtype.is_floating_point:
        return weights[0].clone()  # integer buffers (position ids, ...): not merged
    work = torch.promote_types(out_dtype, torch.float32)
    ws = [w.to(work) for w in weights]
    if rule == "mean":
        return (sum(ws) / len(ws)).to(out_dtype)
    if base is None:
        raise ValueError(f"{name}: non_linear 'task_arithmetic' needs the base model")
    b = base.to(device=ws[0].device, dtype=work)
    return (b + float(scaling_factor) * sum(w - b for w in ws)).to(out_dtype)

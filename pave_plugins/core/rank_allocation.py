"""Spectral rank allocation (PAVE paper, Sec. 3.3, Algorithm 1, eq. 8-9).

For one layer with K models of full rank R, normalise each model's singular values of
``W_i C_i`` by its largest (``s_ij = sigma_ij / sigma_i,max``, line 4), start from ``r_i = R``
(line 5) and, while ``sum_i r_i / (K R) > rho`` (line 7), decrement the rank of the model whose
last kept normalised singular value ``s_{i, r_i}`` is smallest among the models still in the index
set (lines 8-9); a model leaves the set once ``r_i <= gamma R`` (lines 10-11). Each step removes
the smallest term that eq. 8 could still remove, which greedily minimises eq. 9.

Implementation: a heap keyed by ``(s_{i, r_i}, i)`` makes a layer O(K R log K); ties go to the
lowest model index, as a first-minimum scan of the literal loop would. A model also leaves the set
at rank 1 (rank 0 would zero the purified weight); if every model reaches its floor before the
budget is met, the loop stops and the allocation reports ``budget_met=False``.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor

#: rank allocations: Algorithm 1, or the uniform baseline of Table 4
ALLOCATIONS: tuple[str, ...] = ("spectral", "uniform")


def default_gamma(rho: float) -> float:
    """The paper's stopping ratio ``gamma = rho - (1 - rho) / 2`` (Appendix A.1)."""
    return rho - (1.0 - rho) / 2.0


def check_rho_gamma(rho: float, gamma: float | None) -> float:
    """Validate ``rho`` in (0, 1] and ``gamma`` in [0, rho) ([0, 1] when rho = 1: every rank is
    kept anyway); return gamma (default filled in)."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho):
        raise ValueError(f"rho must be a number in (0, 1], got {rho!r}")
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho (preserved rank ratio) must be in (0, 1], got {rho}")
    if gamma is None:
        return default_gamma(rho)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma):
        raise ValueError(f"gamma must be a number, got {gamma!r}")
    if gamma < 0.0 or gamma > 1.0:
        raise ValueError(f"gamma (stopping ratio) must be in [0, rho), got {gamma}")
    if rho < 1.0 and gamma >= rho:
        raise ValueError(
            f"gamma (stopping ratio) must be smaller than rho, got gamma={gamma} >= rho={rho}: "
            "the budget could never be met"
        )
    return float(gamma)


def _normalised(singular_values: Sequence[Tensor]) -> list[list[float]]:
    if len(singular_values) == 0:
        raise ValueError("spectral rank allocation needs at least one model")
    lengths = {int(s.numel()) for s in singular_values}
    if len(lengths) != 1:
        raise ValueError(f"all models must have the same full rank for a layer, got lengths {sorted(lengths)}")
    out = []
    for i, s in enumerate(singular_values):
        s = s.detach().double().flatten().cpu()
        if s.numel() == 0:
            raise ValueError("a layer with zero singular values cannot be ranked")
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise ValueError(f"model {i}: singular values must be finite and non-negative")
        if bool((s[1:] > s[:-1]).any()):
            raise ValueError(f"model {i}: singular values must be sorted in descending order")
        smax = float(s[0])
        out.append((s / smax).tolist() if smax > 0 else [0.0] * s.numel())
    return out


def spectral_rank_allocation(
    singular_values: Sequence[Tensor], rho: float, gamma: float | None = None
) -> list[int]:
    """Algorithm 1 (lines 3-13) for one layer; returns ``r_i`` for each of the K models."""
    return _allocate_layer(singular_values, rho, gamma)[0]


def _allocate_layer(
    singular_values: Sequence[Tensor], rho: float, gamma: float | None
) -> tuple[list[int], bool]:
    gamma = check_rho_gamma(rho, gamma)
    s = _normalised(singular_values)
    k, full = len(s), len(s[0])
    ranks = [full] * k
    total = k * full
    # tolerances: rho * K * R and gamma * R can land a hair below an integer (0.57 * 100 =
    # 56.99999999999999), which would remove one rank too many
    budget = rho * total + 1e-9
    floor = gamma * full + 1e-9
    # a model whose rank already sits at its floor never enters the index set
    heap = [(s[i][full - 1], i) for i in range(k) if full > floor and full > 1]
    heapq.heapify(heap)
    current = total
    while current > budget and heap:
        _, t = heapq.heappop(heap)
        ranks[t] -= 1
        current -= 1
        if ranks[t] > floor and ranks[t] > 1:
            heapq.heappush(heap, (s[t][ranks[t] - 1], t))
    return ranks, current <= budget


def uniform_rank_allocation(full_rank: int, num_models: int, rho: float) -> list[int]:
    """The non-adaptive baseline of Table 4: every model keeps ``max(1, floor(rho R))``."""
    check_rho_gamma(rho, None)
    r = max(1, math.floor(rho * full_rank + 1e-9))
    return [r] * num_models


@dataclass
class RankAllocation:
    """Per-layer ranks of every model and the per-model ratios of Algorithm 1 line 15."""

    ranks: dict[str, list[int]]
    full_ranks: dict[str, int]
    model_ratios: list[float]
    budget_met: dict[str, bool] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "ranks": self.ranks,
            "full_ranks": self.full_ranks,
            "model_ratios": self.model_ratios,
            "budget_met": self.budget_met,
        }


def model_rank_ratios(ranks: Mapping[str, Sequence[int]], full_ranks: Mapping[str, int]) -> list[float]:
    """Algorithm 1 line 15: ``rho_i = sum_l r_i^l / sum_l R^l``."""
    if not ranks:
        return []
    k = len(next(iter(ranks.values())))
    denom = sum(full_ranks[layer] for layer in ranks)
    return [sum(ranks[layer][i] for layer in ranks) / denom for i in range(k)]


def allocate_ranks(
    layer_singular_values: Mapping[str, Sequence[Tensor]],
    rho: float,
    gamma: float | None = None,
    *,
    method: str = "spectral",
) -> RankAllocation:
    """Algorithm 1 over a whole model: ``layer -> [sigma of model 1, ..., sigma of model K]``.

    ``method="uniform"`` gives the plain baseline of Table 4 with the same budget.
    """
    if method not in ALLOCATIONS:
        raise ValueError(f"unknown rank allocation {method!r}, expected 'spectral' or 'uniform'")
    ranks: dict[str, list[int]] = {}
    full_ranks: dict[str, int] = {}
    met: dict[str, bool] = {}
    for layer, svals in layer_singular_values.items():
        full = int(svals[0].numel())
        full_ranks[layer] = full
        if method == "spectral":
            ranks[layer], met[layer] = _allocate_layer(svals, rho, gamma)
        else:
            ranks[layer] = uniform_rank_allocation(full, len(svals), rho)
            met[layer] = sum(ranks[layer]) <= rho * full * len(svals) + 1e-9  # False only when the rank-1 floor binds
    return RankAllocation(
        ranks=ranks, full_ranks=full_ranks, model_ratios=model_rank_ratios(ranks, full_ranks), budget_met=met
    )

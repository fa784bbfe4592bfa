"""PAVE for one weight matrix of K fine-tuned models (PAVE paper, Sec. 3.2-3.3).

The per-layer orchestration shared by every adapter (mergekit ``pave`` / ``pave purify``,
FusionBench ``pave/pave``, the benchmark harness):

1. one context-oriented SVD per model, ``W_ft,i C_i = U_i S_i V_i^T`` (eq. 5; of ``dW_i C_i`` with
   ``target="delta"``), :func:`layer_co_svds` (Algorithm 1 line 3);
2. the ranks ``r_i`` of the K models from their singular values: Algorithm 1 lines 4-13, the greedy
   minimiser of eq. 9 under the budget ``sum_i r_i <= rho K R`` and the floor ``gamma R``
   (``allocation="spectral"``), or the uniform baseline of Table 4 (``allocation="uniform"``);
3. the purified task vector of eq. 6, ``dW_PAVE,i = SVD_{r_i}(W_ft,i C_i) C_i^{-1} - W_base``,
   from the same decomposition (:func:`pave_plugins.core.purify_from_cosvd`).

Algorithm 1 is per layer (its loop over l only shares the output ratios of line 15, which
:func:`pave_plugins.core.model_rank_ratios` computes from the per-layer ranks), so one call handles
one layer. Models given no covariance (``None``) are not purified: their plain task vector passes
through unchanged (whether that is allowed is the adapter's decision), and the ranks are allocated
across the models that have one. :func:`purify_layer` does steps 1-3; adapters that cache the
decompositions (the harness, across values of ``rho``) call :func:`purify_layer_from_cosvds`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import MutableSequence, Sequence

import torch
from torch import Tensor

from .purify import CoSVD, PreparedCovariance, Purification, Target, co_svd, purify_from_cosvd
from .rank_allocation import ALLOCATIONS, allocate_ranks, check_rho_gamma


class LayerModelError(ValueError):
    """A ``ValueError`` about one model of a layer (its weight or covariance); ``model_index`` says
    which, so that an adapter can name the model's files. The message is the one core raised."""

    def __init__(self, message: str, model_index: int):
        super().__init__(message)
        self.model_index = model_index


@dataclass
class LayerPurification:
    """PAVE result for one layer of K models.

    ``purifications[i]`` is model i's :class:`Purification` (task vector of eq. 6, rank, damping,
    relative change, pruning error of eq. 8, low-rank tail), or ``None`` for a model without a
    covariance (its plain task vector ``W_ft - W_base`` is kept). ``ranks[i]`` is ``r_i`` (full rank
    for models without a covariance); ``budget_met`` is Algorithm 1's flag for the models ranked
    (False when every model reached its floor ``gamma R`` before ``sum r_i <= rho K R``).
    """

    purifications: list[Purification | None]
    ranks: list[int]
    full_rank: int
    budget_met: bool

    @property
    def task_vectors(self) -> list[Tensor | None]:
        """dW_PAVE of each model (eq. 6, in its weight's dtype); ``None`` = plain task vector kept."""
        return [p.task_vector if p is not None else None for p in self.purifications]

    @property
    def purified(self) -> list[bool]:
        return [p is not None for p in self.purifications]


def layer_co_svds(
    w_base: Tensor,
    w_fts: Sequence[Tensor],
    covariances: Sequence[Tensor | PreparedCovariance | None],
    *,
    target: Target = "weight",
    compute_dtype: torch.dtype = torch.float64,
    names: Sequence[str],
    device: torch.device | str | None = None,
) -> list[CoSVD | None]:
    """One CO-SVD per model (eq. 5, Algorithm 1 line 3); ``None`` for models without a covariance.

    ``names[i]`` names model i's weight in errors; a ``ValueError`` from core is re-raised as
    :class:`LayerModelError` with the same message. ``device``: move each weight there first
    (one at a time); by default the computation follows the fine-tuned weights' device.
    """
    if not len(w_fts) == len(covariances) == len(names):
        raise ValueError(
            f"{len(w_fts)} fine-tuned weights, {len(covariances)} covariances and {len(names)} names: "
            "expected one of each per model"
        )
    base = w_base if device is None else w_base.to(device)
    out: list[CoSVD | None] = []
    for i, (w_ft, cov) in enumerate(zip(w_fts, covariances)):
        if cov is None:
            out.append(None)
            continue
        try:
            out.append(
                co_svd(
                    w_ft if device is None else w_ft.to(device),
                    base,
                    cov,
                    target=target,
                    compute_dtype=compute_dtype,
                    name=names[i],
                )
            )
        except ValueError as exc:
            raise LayerModelError(str(exc), i) from exc
    return out


def purify_layer_from_cosvds(
    cosvds: MutableSequence[CoSVD | None],
    *,
    rho: float,
    gamma: float | None = None,
    allocation: str = "spectral",
    names: Sequence[str],
    name: str = "weight",
    release: bool = False,
) -> LayerPurification:
    """Ranks (Algorithm 1 / eq. 9, or uniform) and purified task vectors (eq. 6) from CO-SVDs.

    ``cosvds[i]`` is model i's :class:`CoSVD` or ``None`` (no covariance: not purified, not ranked).
    ``release=True`` sets each entry of ``cosvds`` to ``None`` once it has been used, so that a
    layer's decompositions are freed one by one (pass a list you own). Validates ``rho``,
    ``gamma`` and ``allocation``, then calls :func:`allocate_and_purify`.
    """
    gamma = check_rho_gamma(rho, gamma)
    if allocation not in ALLOCATIONS:
        raise ValueError(f"{name}: unknown rank allocation {allocation!r}, expected one of {ALLOCATIONS}")
    return allocate_and_purify(cosvds, rho=rho, gamma=gamma, allocation=allocation, names=names, name=name,
                               release=release)


def allocate_and_purify(
    cosvds: MutableSequence[CoSVD | None],
    *,
    rho: float,
    gamma: float,
    allocation: str,
    names: Sequence[str],
    name: str,
    release: bool,
    ranks: Sequence[int] | None = None,
) -> LayerPurification:
    """:func:`purify_layer_from_cosvds` for settings that were already validated (``gamma`` filled in);
    ``ranks`` given (one per model): those ranks instead of Algorithm 1's (``rank_granularity: model``)."""
    if len(names) != len(cosvds):
        raise ValueError(f"{name}: {len(cosvds)} decompositions but {len(names)} names")
    todo = [i for i, d in enumerate(cosvds) if d is not None]
    if not todo:
        raise ValueError(f"{name}: no model has a covariance for this layer, nothing to purify")
    full = cosvds[todo[0]].full_rank  # type: ignore[union-attr]
    if ranks is None:
        alloc = allocate_ranks({name: [cosvds[i].s for i in todo]}, rho, gamma, method=allocation)  # type: ignore[union-attr]
        chosen, budget_met = alloc.ranks[name], alloc.budget_met[name]
    else:
        chosen = [ranks[i] for i in todo]
        budget_met = sum(chosen) <= rho * len(todo) * full
    out_ranks = [full] * len(cosvds)
    purifications: list[Purification | None] = [None] * len(cosvds)
    for i, r in zip(todo, chosen):
        out_ranks[i] = r
        purifications[i] = purify_from_cosvd(cosvds[i], r, name=names[i])  # type: ignore[arg-type]
        if release:
            cosvds[i] = None
    return LayerPurification(purifications=purifications, ranks=out_ranks, full_rank=full, budget_met=budget_met)


def purify_layer(
    w_base: Tensor,
    w_fts: Sequence[Tensor],
    covariances: Sequence[Tensor | PreparedCovariance | None],
    *,
    rho: float,
    gamma: float | None = None,
    allocation: str = "spectral",
    target: Target = "weight",
    compute_dtype: torch.dtype = torch.float64,
    name: str = "weight",
    model_names: Sequence[str] | None = None,
    device: torch.device | str | None = None,
) -> LayerPurification:
    """PAVE for one layer: CO-SVD per model (eq. 5), ranks by Algorithm 1 (eq. 8-9; ``rho``,
    ``gamma``) or uniform, purified task vectors ``dW_PAVE,i`` (eq. 6).

    ``w_base`` and ``w_fts[i]`` are ``out x in``; ``covariances[i]`` is ``C_i`` (``in x in``, raw or
    from :func:`prepare_covariance`) or ``None`` to keep model i's plain task vector. ``name`` is the
    layer (errors, allocation); ``model_names[i]`` names model i's weight in errors (default
    ``"<name> of model <i>"``). The computation runs in ``compute_dtype`` on ``device`` (default: the
    fine-tuned weights' device); task vectors come back in each fine-tuned weight's dtype.
    """
    check_rho_gamma(rho, gamma)
    if allocation not in ALLOCATIONS:
        raise ValueError(f"{name}: unknown rank allocation {allocation!r}, expected one of {ALLOCATIONS}")
    names = list(model_names) if model_names is not None else [f"{name} of model {i}" for i in range(len(w_fts))]
    decs = layer_co_svds(
        w_base, w_fts, covariances, target=target, compute_dtype=compute_dtype, names=names, device=device
    )
    return purify_layer_from_cosvds(
        decs, rho=rho, gamma=gamma, allocation=allocation, names=names, name=name, release=True
    )

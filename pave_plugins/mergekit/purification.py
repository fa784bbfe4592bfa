"""Purify one tensor of K fine-tuned models: the step shared by the ``pave`` merge method and
``pave purify``.

For one weight name, :func:`pave_plugins.core.layer.purify_layer`: one context-oriented SVD per
model (PAVE eq. 5), ranks for the K models from Algorithm 1 on those singular values (or the
uniform baseline), then the purified task vector of eq. 6 from the same decomposition. This module
adds the checks, errors and report record of the mergekit side. The purified *weight*
``W_base + dW_PAVE`` is returned in the input dtype, so that merging it with any task-vector method
gives exactly what that method gives on a checkpoint holding it.

No mergekit import here (``pave purify`` uses it without mergekit).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from pave_plugins.core import PreparedCovariance
from pave_plugins.core.layer import LayerModelError, purify_layer
from pave_plugins.core.rank_allocation import check_rho_gamma
from pave_plugins.io.covariance import MissingCovarianceError

logger = logging.getLogger("pave_plugins.mergekit")

ALLOCATIONS = ("spectral", "uniform")
COMPUTE_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class TensorPurification:
    """Result for one tensor: purified weights (None = model not purified) and the report record."""

    weights: list[Tensor | None]
    record: dict[str, Any] = field(default_factory=dict)


def purify_tensor(
    name: str,
    base: Tensor,
    fine_tuned: Sequence[Tensor],
    covariances: Sequence[PreparedCovariance | None],
    *,
    labels: Sequence[str],
    rho: float,
    gamma: float | None = None,
    rank_allocation: str = "spectral",
    target: str = "weight",
    compute_dtype: torch.dtype = torch.float64,
    cov_keys: Sequence[str | None] | None = None,
    sources: Sequence[str | None] | None = None,
    allow_missing_covariance: bool = False,
) -> TensorPurification:
    """Purify ``fine_tuned[i]`` with ``covariances[i]`` (models with ``None`` keep their weight).

    Algorithm 1 runs across the models that have a covariance for this tensor. ``labels`` name
    the models in errors and in the record; ``sources`` (covariance file paths) are named in
    errors about a covariance that does not fit the weight. A 2-D tensor that some models have a
    covariance for and others lack raises :class:`MissingCovarianceError` unless
    ``allow_missing_covariance`` (then the models without one keep their plain task vector).
    """
    check_rho_gamma(rho, gamma)
    if rank_allocation not in ALLOCATIONS:
        raise ValueError(f"{name}: unknown rank_allocation {rank_allocation!r}, expected one of {ALLOCATIONS}")
    k = len(fine_tuned)
    cov_keys = list(cov_keys) if cov_keys is not None else [None] * k
    sources = list(sources) if sources is not None else [None] * k
    models: dict[str, dict[str, Any]] = {}
    if base.is_floating_point():  # also tensors that are not purified (norms, embeddings): never merge NaN
        for lab, t in zip(["base model", *labels], [base, *fine_tuned]):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: the weight of {lab} contains NaN or Inf")
    if base.ndim != 2:
        models = {lab: {"purified": False, "reason": f"not a 2-D weight ({base.ndim}-D)"} for lab in labels}
        return TensorPurification(weights=[None] * k, record={"purified": False, "models": models})
    todo = [i for i in range(k) if covariances[i] is not None]
    lacking = [i for i in range(k) if covariances[i] is None]
    if todo and lacking:
        what = [f"{labels[i]} ({sources[i] if sources[i] else 'no covariance file given'})" for i in lacking]
        if not allow_missing_covariance:
            raise MissingCovarianceError(
                f"{name}: missing covariance for model(s) {what}, while model(s) "
                f"{[labels[i] for i in todo]} have one for this layer; give covariance files that cover it, "
                "or set allow_missing_covariance (pave purify: --allow-missing-covariance) to keep the plain "
                "task vector of the models without one"
            )
        logger.warning("pave: %s: no covariance for model(s) %s; their plain task vector is kept", name, what)
    for i in lacking:
        models[labels[i]] = {"purified": False, "reason": "no covariance for this layer"}
    if not todo:
        return TensorPurification(weights=[None] * k, record={"purified": False, "models": models})

    try:
        layer = purify_layer(
            base,
            fine_tuned,
            covariances,
            rho=rho,
            gamma=gamma,
            allocation=rank_allocation,
            target=target,  # type: ignore[arg-type]
            compute_dtype=compute_dtype,
            name=name,
            model_names=[f"{name} of model {lab}" for lab in labels],
        )
    except LayerModelError as exc:
        i = exc.model_index
        where = f" (covariance {cov_keys[i]!r} in {sources[i]})" if sources[i] else ""
        hint = "; was the covariance collected for another model?" if "covariance is" in str(exc) else ""
        raise ValueError(f"{exc}{where}{hint}") from exc
    full = layer.full_rank
    budget_met = sum(layer.ranks[i] for i in todo) <= rho * len(todo) * full + 1e-9

    weights: list[Tensor | None] = [None] * k
    for i in todo:
        p = layer.purifications[i]  # not None: model i has a covariance
        weights[i] = (base.to(p.task_vector.dtype) + p.task_vector).to(fine_tuned[i].dtype)  # type: ignore[union-attr]
        models[labels[i]] = {
            "purified": True,
            "rank": p.rank,
            "full_rank": p.full_rank,
            "damping": p.damping,
            "relative_damping": covariances[i].relative_damping,  # type: ignore[union-attr]
            "relative_change": p.relative_change,
            "pruning_error": p.pruning_error,
            "covariance_key": cov_keys[i],
        }
        layer.purifications[i] = None  # free the task vector once the weight is built
    models = {lab: models[lab] for lab in labels}
    record = {"purified": True, "full_rank": full, "budget_met": budget_met, "models": models}
    return TensorPurification(weights=weights, record=record)

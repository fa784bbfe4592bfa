"""The settings record warns where float32 is known to be unusable: eq. 6 (``target: weight``)."""

from __future__ import annotations

import logging

import torch

from pave_plugins.core.purify import co_svd, purify_from_cosvd
from pave_plugins.engine.settings import PaveSettings, warn_float32_weight_target


def _warnings(caplog, **kwargs) -> list[str]:
    warn_float32_weight_target.cache_clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pave_plugins"):
        PaveSettings(**kwargs)
        PaveSettings(**kwargs)  # once per process, not once per tensor
    return [r.getMessage() for r in caplog.records if "float32" in r.getMessage()]


def test_float32_with_eq6_warns_once(caplog):
    assert len(_warnings(caplog, compute_dtype="float32", target="weight")) == 1
    assert _warnings(caplog, compute_dtype="float32", target="delta") == []
    assert _warnings(caplog, compute_dtype="float64", target="weight") == []


def test_the_warning_is_true_on_an_ill_conditioned_layer():
    """What the warning says, measured: with cond(C) = 1e6, eq. 6 in float32 is far off float64, and
    several times further than the task-vector target (96x128 layer, dW = 1e-3 W, rank 90 of 96)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g) / 128**0.5
    ft = w + 1e-3 * torch.randn(96, 128, generator=g) / 128**0.5
    x = torch.randn(512, 128, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 128, dtype=torch.float64)
    cov = x.T @ x
    err = {}
    r = 90
    for target in ("weight", "delta"):
        d64 = purify_from_cosvd(co_svd(ft, w, cov, target=target, compute_dtype=torch.float64), r).task_vector.double()
        d32 = purify_from_cosvd(co_svd(ft, w, cov, target=target, compute_dtype=torch.float32), r).task_vector.double()
        err[target] = float((d32 - d64).norm() / d64.norm())
    assert err["weight"] > 0.1 and err["weight"] > 5 * err["delta"], err

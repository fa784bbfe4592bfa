"""PAVE written out from the paper for adapter tests, sharing no code with ``pave_plugins.core``:
eq. 5 with an explicit inverse in float64, and Algorithm 1 transcribed line by line."""

from __future__ import annotations

import math

import torch


def eq5(w: torch.Tensor, c: torch.Tensor, rank: int) -> torch.Tensor:
    """``SVD_r(W C) C^{-1}`` in float64 (``W`` the fine-tuned weight, or the task vector for
    ``target="delta"``)."""
    w, c = w.double(), c.double()
    u, s, vh = torch.linalg.svd(w @ c, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(c)


def ranks(
    mats: list[torch.Tensor],
    covs: list[torch.Tensor],
    rho: float,
    method: str = "spectral",
) -> list[int]:
    """Algorithm 1 (default gamma = rho - (1 - rho) / 2) on the singular values of ``M_i C_i``, or
    the uniform baseline ``floor(rho R)``."""
    full = min(mats[0].shape)
    if method == "uniform":
        return [max(1, math.floor(rho * full + 1e-9))] * len(mats)
    svals = [
        torch.linalg.svdvals(m.double() @ c.double()).tolist()
        for m, c in zip(mats, covs)
    ]
    return literal_algorithm_1(svals, rho, rho - (1 - rho) / 2)


def purified_weights(
    w_base, w_fts, covs, rho, target="weight", method="spectral"
) -> list[torch.Tensor]:
    """``W_base + dW_PAVE`` per model (float64)."""
    b = w_base.double()
    mats = [w.double() - b if target == "delta" else w.double() for w in w_fts]
    rs = ranks(mats, covs, rho, method)
    return [
        eq5(m, c, r) + (b if target == "delta" else 0)
        for m, c, r in zip(mats, covs, rs)
    ]


def literal_algorithm_1(svals: list[list[float]], rho: float, gamma: float) -> list[int]:
    """Lines 4-13 of Algorithm 1, transcribed line by line (first index wins a tie)."""
    K, R = len(svals), len(svals[0])
    s = [[v / row[0] for v in row] for row in svals]  # line 4
    r = [R] * K  # line 5
    index_set = list(range(K))  # line 6
    while sum(r) / (K * R) > rho and index_set:  # line 7 (stops if the set empties)
        t = min(index_set, key=lambda i: (s[i][r[i] - 1], i))  # line 8 (s_{i, r_i}, 1-based)
        r[t] -= 1  # line 9
        if r[t] <= gamma * R or r[t] <= 1:  # lines 10-11 (+ rank >= 1)
            index_set.remove(t)
    return r

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


def damped_covariance(c: torch.Tensor, damping: float, rule: str, n_tokens: int | None = None) -> torch.Tensor:
    """The damped covariance of the reference (float64): ``C + damping mean(diag C) I``, or the
    authors' loop transcribed from their NLG code (eps on ``C / N`` doubled until
    ``||C_d^{-1} C_d - I|| < 1e-2``, tested in float32 as their covariances are)."""
    c = c.double()
    if rule == "relative":
        return c + damping * float(torch.diagonal(c).mean()) * torch.eye(c.shape[0], dtype=c.dtype)
    mean, eps = (c / n_tokens).float(), damping
    eye = torch.eye(c.shape[0])
    while True:
        reg = mean + eps * eye
        if torch.norm(torch.inverse(reg) @ reg - eye) < 1e-2:
            return (c / n_tokens) + eps * torch.eye(c.shape[0], dtype=c.dtype)
        eps *= 2


def authors_pave(layers: dict, rho: float, *, damping: float = 0.0, rule: str = "relative",
                 granularity: str = "layer", kept: tuple[int, ...] = ()) -> tuple[dict, dict]:
    """PAVE (target weight) over a model as its authors ran it, from the paper and their code:
    ``layers[name] = (W_base, [W_ft,i], [C_i], [N_i])`` -> ``{name: [purified weight of model i]}`` and
    ``{name: {model: rank}}``.

    Damped C; Algorithm 1 per layer over the models not ``kept``; ``granularity="model"``: each
    model's ratio ``sum_l r_i^l / sum_l R^l`` cuts all its layers at ``max(1, round(ratio R))``;
    eq. 5 with an explicit inverse; kept models keep their fine-tuned weight."""
    gamma = rho - (1 - rho) / 2
    k = len(next(iter(layers.values()))[1])
    todo = [i for i in range(k) if i not in kept]
    cd = {(i, n): damped_covariance(lay[2][i], damping, rule, lay[3][i]) for n, lay in layers.items() for i in todo}
    ranks = {}
    for n, (_, fts, _, _) in layers.items():
        svals = [torch.linalg.svdvals(fts[i].double() @ cd[i, n]).tolist() for i in todo]
        ranks[n] = dict(zip(todo, literal_algorithm_1(svals, rho, gamma)))
    if granularity == "model":
        total = sum(min(lay[0].shape) for lay in layers.values())
        ratio = {i: sum(ranks[n][i] for n in layers) / total for i in todo}
        ranks = {n: {i: max(1, round(ratio[i] * min(lay[0].shape))) for i in todo} for n, lay in layers.items()}
    weights = {n: [eq5(lay[1][i], cd[i, n], ranks[n][i]) if i in todo else lay[1][i].double() for i in range(k)]
               for n, lay in layers.items()}
    return weights, ranks

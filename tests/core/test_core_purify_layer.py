"""core.layer.purify_layer against a brute-force transcription of the PAVE paper: dense SVD of
``W C`` (or ``dW C``), ranks by a literal Algorithm 1 (or floor(rho R)), truncation, times an
explicit ``C^{-1}`` (eq. 5-6), all in float64 on small well-conditioned layers."""

from __future__ import annotations

import math

import pytest
import torch

from pave_plugins.core.layer import LayerModelError, purify_layer, purify_layer_from_cosvds
from pave_plugins.core.purify import co_svd


def literal_algorithm_1(sigmas: list[torch.Tensor], rho: float, gamma: float) -> list[int]:
    """Algorithm 1 lines 4-13, written as in the paper (first minimum across the index set I)."""
    k, full = len(sigmas), len(sigmas[0])
    s = [(sg / sg.max()).tolist() for sg in sigmas]  # line 4
    r = [full] * k  # line 5
    index_set = list(range(k))  # line 6
    while sum(r) / (k * full) > rho:  # line 7
        t = min(index_set, key=lambda i: s[i][r[i] - 1])  # line 8: smallest s_{i, r_i}
        r[t] -= 1  # line 9
        if r[t] <= gamma * full:  # lines 10-11
            index_set.remove(t)
    return r


def brute_force(w_base, w_fts, covs, rho, gamma, allocation, target):
    """Ranks and dW_PAVE,i = SVD_{r_i}(A_i C_i) C_i^{-1} - W_base (+ W_base for target delta)."""
    decomps = []
    for w, c in zip(w_fts, covs):
        a = w if target == "weight" else w - w_base
        u, s, vh = torch.linalg.svd(a @ c, full_matrices=False)
        decomps.append((u, s, vh))
    full = len(decomps[0][1])
    if allocation == "spectral":
        ranks = literal_algorithm_1([d[1] for d in decomps], rho, gamma)
    else:
        ranks = [math.floor(rho * full)] * len(w_fts)
    tvs = []
    for (u, s, vh), c, r in zip(decomps, covs, ranks):
        truncated = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
        projected = truncated @ torch.linalg.inv(c)  # eq. 5 with an explicit inverse
        tvs.append(projected - w_base if target == "weight" else projected)  # eq. 6
    return ranks, tvs


def make_layer(out_dim: int, in_dim: int, k: int, seed: int, decay: list[float]):
    """Base weight, K fine-tunes, K well-conditioned covariances X^T X / n + I (cond ~ 1e2)."""
    g = torch.Generator().manual_seed(seed)
    w_base = 0.05 * torch.randn(out_dim, in_dim, generator=g, dtype=torch.float64)  # small: W C differs per model
    w_fts, covs = [], []
    for i in range(k):
        # task vector with a decaying spectrum (model-specific decay): ranks differ per model
        left = torch.linalg.qr(torch.randn(out_dim, out_dim, generator=g, dtype=torch.float64))[0]
        right = torch.linalg.qr(torch.randn(in_dim, in_dim, generator=g, dtype=torch.float64))[0]
        n = min(out_dim, in_dim)
        spec = torch.tensor([decay[i] ** j for j in range(n)], dtype=torch.float64)
        w_fts.append(w_base + 0.3 * left[:, :n] @ torch.diag(spec) @ right[:, :n].T)
        x = torch.randn(4 * in_dim, in_dim, generator=g, dtype=torch.float64)
        x = x * torch.logspace(0, -1, in_dim, dtype=torch.float64)
        covs.append(x.T @ x / x.shape[0] + 0.01 * torch.eye(in_dim, dtype=torch.float64))
    return w_base, w_fts, covs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


CASES = [
    # out, in, K, rho, gamma, allocation, target
    (10, 12, 3, 0.75, None, "spectral", "weight"),  # wide: the QR path of core
    (14, 8, 3, 0.75, 0.5, "spectral", "weight"),  # tall
    (12, 12, 4, 0.5, 0.25, "spectral", "delta"),  # a model reaches its floor gamma R
    (10, 12, 3, 0.625, None, "spectral", "delta"),
    (9, 11, 2, 0.75, None, "uniform", "weight"),
    (11, 9, 3, 0.875, None, "uniform", "delta"),
]


@pytest.mark.parametrize("case", CASES)
def test_purify_layer_matches_brute_force(case):
    out_dim, in_dim, k, rho, gamma, allocation, target = case
    w_base, w_fts, covs = make_layer(out_dim, in_dim, k, seed=out_dim * in_dim + k, decay=[0.4, 0.7, 0.9, 0.55][:k])
    g = gamma if gamma is not None else rho - (1 - rho) / 2  # Appendix A.1 default
    ranks, tvs = brute_force(w_base, w_fts, covs, rho, g, allocation, target)
    res = purify_layer(w_base, w_fts, covs, rho=rho, gamma=gamma, allocation=allocation, target=target, name="l")
    full = min(out_dim, in_dim)
    assert res.full_rank == full
    assert res.ranks == ranks
    assert sum(ranks) <= rho * k * full and res.budget_met
    if allocation == "spectral":
        assert len(set(ranks)) > 1  # the adaptive allocation did something model-specific
    for i, (p, tv) in enumerate(zip(res.purifications, tvs)):
        assert p is not None and p.rank == ranks[i] and p.full_rank == full
        assert p.task_vector.dtype == torch.float64
        assert rel(p.task_vector, tv) < 1e-9, i
        assert rel(res.task_vectors[i], tv) < 1e-9
        dw = w_fts[i] - w_base
        assert p.relative_change == pytest.approx(float((tv - dw).norm() / dw.norm()), rel=1e-8)
        assert p.damping == 0.0


def test_floor_case_really_uses_gamma():
    """With rho=1/2, gamma=0.4 the fast-decaying model 0 stops at its floor (first r <= 4.8), so
    the budget is taken from the others; without the floor it would go lower."""
    w_base, w_fts, covs = make_layer(12, 12, 4, seed=12 * 12 + 4, decay=[0.4, 0.7, 0.9, 0.55])
    sigmas = [torch.linalg.svdvals((w - w_base) @ c) for w, c in zip(w_fts, covs)]
    res = purify_layer(w_base, w_fts, covs, rho=0.5, gamma=0.4, target="delta", name="l")
    assert res.ranks == literal_algorithm_1(sigmas, 0.5, 0.4)
    assert res.ranks[0] == 4 and literal_algorithm_1(sigmas, 0.5, 0.0)[0] < 4


def test_missing_covariance_passes_through_and_is_not_ranked():
    w_base, w_fts, covs = make_layer(10, 12, 3, seed=7, decay=[0.4, 0.7, 0.9])
    res = purify_layer(w_base, w_fts, [covs[0], None, covs[2]], rho=0.75, name="l")
    ranks, tvs = brute_force(w_base, [w_fts[0], w_fts[2]], [covs[0], covs[2]], 0.75, 0.625, "spectral", "weight")
    assert res.purified == [True, False, True]
    assert res.task_vectors[1] is None and res.purifications[1] is None
    assert res.ranks == [ranks[0], 10, ranks[1]]  # the model without covariance: full rank
    assert rel(res.task_vectors[0], tvs[0]) < 1e-9 and rel(res.task_vectors[2], tvs[1]) < 1e-9


def test_float32_weights_come_back_in_float32():
    w_base, w_fts, covs = make_layer(10, 12, 3, seed=3, decay=[0.4, 0.7, 0.9])
    _, tvs = brute_force(w_base, w_fts, covs, 0.75, 0.625, "spectral", "weight")
    res = purify_layer(w_base.float(), [w.float() for w in w_fts], [c.float() for c in covs], rho=0.75, name="l")
    for tv, ref in zip(res.task_vectors, tvs):
        assert tv.dtype == torch.float32
        assert rel(tv, ref) < 1e-5


def test_full_rank_returns_the_plain_task_vector():
    w_base, w_fts, covs = make_layer(10, 12, 2, seed=5, decay=[0.4, 0.7])
    res = purify_layer(w_base, w_fts, covs, rho=1.0, name="l")
    assert res.ranks == [10, 10]
    for tv, w in zip(res.task_vectors, w_fts):
        assert torch.equal(tv, w - w_base)


def test_errors_name_the_model():
    w_base, w_fts, covs = make_layer(10, 12, 3, seed=9, decay=[0.4, 0.7, 0.9])
    bad = torch.eye(11, dtype=torch.float64)
    with pytest.raises(LayerModelError, match="m1: covariance is") as info:
        purify_layer(w_base, w_fts, [covs[0], bad, covs[2]], rho=0.75, name="l", model_names=["m0", "m1", "m2"])
    assert info.value.model_index == 1 and isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="unknown rank allocation"):
        purify_layer(w_base, w_fts, covs, rho=0.75, allocation="greedy", name="l")
    with pytest.raises(ValueError, match="gamma"):
        purify_layer(w_base, w_fts, covs, rho=0.75, gamma=0.8, name="l")
    with pytest.raises(ValueError, match="no model has a covariance"):
        purify_layer(w_base, w_fts, [None] * 3, rho=0.75, name="l")


def test_from_cosvds_release_frees_the_decompositions():
    w_base, w_fts, covs = make_layer(10, 12, 2, seed=11, decay=[0.4, 0.7])
    decs = [co_svd(w, w_base, c) for w, c in zip(w_fts, covs)]
    kept = purify_layer_from_cosvds(list(decs), rho=0.75, names=["a", "b"])
    res = purify_layer_from_cosvds(decs, rho=0.75, names=["a", "b"], release=True)
    assert decs == [None, None]
    assert kept.ranks == res.ranks
    for a, b in zip(kept.task_vectors, res.task_vectors):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- finer guards
def test_layer_messages_name_the_layer_and_the_models():
    """Errors name the layer (``name``, default ``weight``) and the model's weight (default
    ``"<name> of model <i>"``)."""
    from pave_plugins.core.layer import layer_co_svds

    w_base, w_fts, covs = make_layer(6, 7, 2, seed=13, decay=[0.4, 0.7])
    bad = torch.eye(5, dtype=torch.float64)
    with pytest.raises(LayerModelError, match=r"^weight of model 1: covariance is \(5, 5\)"):
        purify_layer(w_base, w_fts, [covs[0], bad], rho=0.75)
    with pytest.raises(LayerModelError, match=r"^l of model 0: covariance is \(5, 5\)"):
        purify_layer(w_base, w_fts, [bad, covs[1]], rho=0.75, name="l")
    with pytest.raises(ValueError, match=r"^l: no model has a covariance for this layer, nothing to purify$"):
        purify_layer(w_base, w_fts, [None, None], rho=0.75, name="l")
    with pytest.raises(ValueError, match=r"^weight: no model has a covariance for this layer"):
        purify_layer_from_cosvds([None, None], rho=0.75, names=["a", "b"])
    with pytest.raises(ValueError, match=r"^l: no model has a covariance for this layer"):
        purify_layer_from_cosvds([None, None], rho=0.75, names=["a", "b"], name="l")
    decs = [co_svd(w, w_base, c) for w, c in zip(w_fts, covs)]
    with pytest.raises(ValueError, match=r"^l: unknown rank allocation 'greedy', expected one of \('spectral', 'uniform'\)$"):
        purify_layer_from_cosvds(decs, rho=0.75, allocation="greedy", names=["a", "b"], name="l")
    with pytest.raises(ValueError, match=r"^l: 2 decompositions but 3 names$"):
        purify_layer_from_cosvds(decs, rho=0.75, names=["a", "b", "c"], name="l")
    with pytest.raises(ValueError, match=r"^2 fine-tuned weights, 1 covariances and 2 names: expected one of each per model$"):
        layer_co_svds(w_base, w_fts, covs[:1], names=["a", "b"])


def test_settings_are_checked_before_any_decomposition():
    """A bad gamma is reported before the (expensive) CO-SVDs, even when a covariance is also bad."""
    w_base, w_fts, covs = make_layer(6, 7, 2, seed=14, decay=[0.4, 0.7])
    bad = torch.eye(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="gamma") as info:
        purify_layer(w_base, w_fts, [covs[0], bad], rho=0.75, gamma=0.9)
    assert not isinstance(info.value, LayerModelError)


def test_release_frees_each_decomposition_before_the_next_purification(monkeypatch):
    """purify_layer (and release=True) drop model i's CO-SVD once it is purified, so that a layer's
    decompositions are freed one by one; by default purify_layer_from_cosvds keeps the caller's list."""
    import weakref

    import pave_plugins.core.layer as layer_mod

    w_base, w_fts, covs = make_layer(8, 9, 3, seed=15, decay=[0.4, 0.7, 0.9])
    seen: list = []
    alive_at_call: list = []
    real = layer_mod.purify_from_cosvd

    def spy(dec, rank, **kw):
        alive_at_call.append([ref() is not None for ref in seen])
        seen.append(weakref.ref(dec))
        return real(dec, rank, **kw)

    monkeypatch.setattr(layer_mod, "purify_from_cosvd", spy)
    purify_layer(w_base, w_fts, covs, rho=0.75, name="l")
    assert alive_at_call == [[], [False], [False, False]]

    decs = [co_svd(w, w_base, c) for w, c in zip(w_fts, covs)]
    kept = list(decs)
    purify_layer_from_cosvds(kept, rho=0.75, names=["a", "b", "c"])
    assert kept == decs and all(d is not None for d in kept)

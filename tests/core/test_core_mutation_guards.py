"""Boundary cases of the core maths that mutation testing (``mutmut run``) showed unguarded: exact
ties of Algorithm 1's budget and floor, rank-1 layers, the paper's default gamma, the uniform
baseline's budget flag, and input checks. Expectations come from the paper's definitions, written
out here."""

from __future__ import annotations

import math

import pytest
import torch
from independent_reference import literal_algorithm_1

from pave_plugins.core.rank_allocation import (
    allocate_ranks,
    check_rho_gamma,
    default_gamma,
    spectral_rank_allocation,
)


@pytest.mark.parametrize("rho", [7 / 8, 15 / 16, 31 / 32, 63 / 64, 0.5])
def test_default_gamma_is_the_papers(rho):
    """Appendix A.1: gamma = rho - (1 - rho) / 2, used whenever gamma is not given."""
    assert default_gamma(rho) == pytest.approx(rho - (1 - rho) / 2, abs=1e-15)
    assert check_rho_gamma(rho, None) == pytest.approx(rho - (1 - rho) / 2, abs=1e-15)
    g = torch.Generator().manual_seed(int(rho * 64))
    svals = [
        torch.sort(
            torch.rand(16, generator=g, dtype=torch.float64), descending=True
        ).values
        for _ in range(3)
    ]
    # a steep spectrum: its model is drained to the floor, so gamma decides its rank
    svals[0] = torch.logspace(0, -8, 16, dtype=torch.float64)
    lists = [s.tolist() for s in svals]
    assert spectral_rank_allocation(svals, rho) == literal_algorithm_1(
        lists, rho, rho - (1 - rho) / 2
    )


def steep_and_flat(full: int) -> list[torch.Tensor]:
    return [
        torch.logspace(0, -6, full, dtype=torch.float64),
        torch.linspace(1.0, 0.9, full, dtype=torch.float64),
    ]


def test_floor_reached_exactly_stops_the_model():
    """gamma R = 4 exactly: the steep model leaves the index set at r = 4 (line 10: r_i <= gamma R),
    and the flat one gives up the rest of the budget (16 -> 10)."""
    svals = steep_and_flat(8)
    ranks = spectral_rank_allocation(svals, 0.625, 0.5)
    assert (
        ranks == literal_algorithm_1([s.tolist() for s in svals], 0.625, 0.5) == [4, 6]
    )


def test_budget_reached_exactly_is_met():
    """rho K R = 12 exactly: stop at sum 12 (line 7 is a strict >), and report the budget as met."""
    svals = steep_and_flat(8)
    alloc = allocate_ranks({"l": svals}, 0.75, 0.25)
    assert sum(alloc.ranks["l"]) == 12 and alloc.budget_met["l"] is True
    assert alloc.ranks["l"] == literal_algorithm_1(
        [s.tolist() for s in svals], 0.75, 0.25
    )


def test_rank_one_layers_keep_rank_one():
    """R = 1: nothing can be removed (rank 0 would zero the purified weight); the budget is not met."""
    svals = [
        torch.tensor([2.0], dtype=torch.float64),
        torch.tensor([0.5], dtype=torch.float64),
    ]
    assert spectral_rank_allocation(svals, 0.5) == [1, 1]
    alloc = allocate_ranks({"bias_like": svals}, 0.5)
    assert alloc.ranks["bias_like"] == [1, 1] and alloc.budget_met["bias_like"] is False
    assert alloc.full_ranks == {"bias_like": 1} and alloc.model_ratios == [1.0, 1.0]


def test_single_model_allocation():
    """K = 1: the model's own spectrum against its own budget."""
    s = torch.logspace(0, -3, 10, dtype=torch.float64)
    alloc = allocate_ranks({"l": [s]}, 0.7)
    assert (
        alloc.ranks["l"] == literal_algorithm_1([s.tolist()], 0.7, 0.7 - 0.3 / 2) == [7]
    )
    assert alloc.full_ranks == {"l": 10} and alloc.budget_met == {"l": True}


def test_uniform_budget_flag():
    """Uniform baseline: floor(rho R) each; met when the sum fits rho K R, including exactly, and
    not when the rank-1 floor overshoots it (3 x 1 > 0.4 x 3 x 2 = 2.4)."""
    s8 = [torch.linspace(1, 0.1, 8, dtype=torch.float64)] * 2
    exact = allocate_ranks({"l": s8}, 0.5, method="uniform")
    assert exact.ranks["l"] == [4, 4] and exact.budget_met["l"] is True
    s2 = [torch.tensor([1.0, 0.5], dtype=torch.float64)] * 3
    over = allocate_ranks({"l": s2}, 0.4, method="uniform")
    assert over.ranks["l"] == [1, 1, 1] and over.budget_met["l"] is False
    assert over.model_ratios == [0.5, 0.5, 0.5]


def test_zero_spectrum_is_drained_first():
    """A model whose task matrix is zero has nothing to lose: its normalised values are 0, so it is
    decremented first, down to its floor (the paper's s_ij = sigma_ij / sigma_max is 0/0 there)."""
    svals = [
        torch.zeros(8, dtype=torch.float64),
        torch.linspace(1.0, 0.5, 8, dtype=torch.float64),
    ]
    ranks = spectral_rank_allocation(svals, 0.75, 0.5)
    assert ranks == [4, 8]
    assert all(math.isfinite(r) for r in ranks)


@pytest.mark.parametrize(
    ("svals", "message"),
    [
        ([torch.tensor([3.0, 1.0, 2.0])], "descending"),
        ([torch.tensor([3.0, 2.0, 2.5, 1.0])], "descending"),
        ([torch.tensor([3.0, -1.0])], "non-negative"),
        ([torch.tensor([3.0, float("nan")])], "finite"),
        ([torch.tensor([])], "zero singular values"),
        ([torch.ones(3), torch.ones(4)], "same full rank"),
        ([], "at least one model"),
    ],
)
def test_malformed_spectra_are_refused(svals, message):
    with pytest.raises(ValueError, match=message):
        spectral_rank_allocation(svals, 0.5)


@pytest.mark.parametrize(
    ("rho", "gamma", "message"),
    [
        ("0.9", None, "rho must be a number"),
        (True, None, "rho must be a number"),
        (float("nan"), None, "rho must be a number"),
        (0.0, None, r"must be in \(0, 1\]"),
        (1.5, None, r"must be in \(0, 1\]"),
        (0.9, "0.5", "gamma must be a number"),
        (0.9, True, "gamma must be a number"),
        (0.9, float("inf"), "gamma must be a number"),
        (0.9, 0.9, "the budget could never be met"),
    ],
)
def test_bad_rho_gamma(rho, gamma, message):
    with pytest.raises(ValueError, match=message):
        check_rho_gamma(rho, gamma)


# ----------------------------------------------------------------------------- LoRA-DV pieces
def test_low_rank_delta_defaults_dtypes_and_tuple_form():
    """No weights means weight 1 each; the decomposition follows compute_dtype; (B, A) works too."""
    from pave_plugins.core import rethink as rt

    g = torch.Generator().manual_seed(0)
    bs = [torch.randn(7, 2, generator=g) for _ in range(2)]
    as_ = [torch.randn(2, 5, generator=g) for _ in range(2)]
    plain = bs[0].double() @ as_[0].double() + bs[1].double() @ as_[1].double()
    lr = rt.LowRankDelta(bs, as_)
    dense = lr.dense(torch.float64)
    assert dense.dtype == torch.float64
    torch.testing.assert_close(dense, plain, rtol=1e-12, atol=1e-12)
    spec = rt.decompose_low_rank(lr, compute_dtype=torch.float64)
    assert spec.s.dtype == torch.float64 and spec.u.dtype == torch.float64
    torch.testing.assert_close(spec.matrix(), plain, rtol=0, atol=1e-12)
    b_cat, a_cat = torch.cat(bs, dim=1), torch.cat(as_, dim=0)
    spec2 = rt.decompose_low_rank((b_cat, a_cat), compute_dtype=torch.float64)
    assert spec2.s.dtype == torch.float64
    torch.testing.assert_close(spec2.matrix(), plain, rtol=0, atol=1e-12)
    dd = rt.decompose_dense(plain.float(), compute_dtype=torch.float64)
    assert dd.s.dtype == torch.float64
    one = rt.decompose_dense(plain, top_k=1, compute_dtype=torch.float64)
    assert one.rank == 1 and float(one.s[0]) == pytest.approx(
        float(torch.linalg.svdvals(plain)[0]), rel=1e-12
    )


@pytest.mark.parametrize(
    ("b", "a", "message"),
    [
        (
            [torch.ones(4, 2), torch.ones(3, 2)],
            [torch.ones(2, 5), torch.ones(2, 5)],
            "do not form",
        ),
        (
            [torch.ones(4, 2), torch.ones(4, 2)],
            [torch.ones(2, 5), torch.ones(2, 6)],
            "do not form",
        ),
        ([torch.ones(4, 2)], [torch.ones(2, 5, 1)], "do not form"),
        ([torch.ones(4)], [torch.ones(1, 5)], "do not form"),
        ([torch.ones(4, 2)], [torch.full((2, 5), float("nan"))], "NaN or Inf"),
    ],
)
def test_low_rank_delta_bad_factors(b, a, message):
    from pave_plugins.core import rethink as rt

    with pytest.raises(ValueError, match=message):
        rt.decompose_low_rank(rt.LowRankDelta(b, a))


def test_loss_defaults_masks_and_shift():
    """classification_loss defaults to cross-entropy; token_loss defaults to no shift; an integer
    0/1 mask selects positions (eq. 14 averaged over them); with shift, position i predicts i+1,
    so the mask is cut at the end; entropy needs no labels, ce does."""
    from pave_plugins.core import rethink as rt

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    logp = torch.log_softmax(logits, -1)
    ce_all = float(-logp.gather(-1, labels[..., None]).mean())
    assert float(rt.token_loss(logits, labels)) == pytest.approx(ce_all, rel=1e-6)
    flat = logits[:, 0]
    assert float(rt.classification_loss(flat, labels[:, 0])) == pytest.approx(
        float(-torch.log_softmax(flat, -1).gather(-1, labels[:, :1]).mean()), rel=1e-6
    )
    ent = -(logp.exp() * logp).sum(-1)  # [2, 5]
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    expect = float(ent[mask.bool()].mean())
    assert float(rt.entropy_loss(logits, mask)) == pytest.approx(expect, rel=1e-6)
    # shift: logits at positions 0..3 predict tokens 1..4; the mask of those positions is mask[:, :4]
    shifted = float(ent[:, :4][mask[:, :4].bool()].mean())
    assert float(
        rt.token_loss(logits, None, "entropy", shift=True, mask=mask)
    ) == pytest.approx(shifted, rel=1e-6)
    with pytest.raises(ValueError, match="needs target tokens"):
        rt.token_loss(logits, None, "ce")
    with pytest.raises(ValueError, match="loss must be one of"):
        rt.token_loss(logits, labels, "mse")


# ----------------------------------------------------------------------------- PAVE eq. 5-6
def _layer(seed=0, out=6, inp=9, tokens=40):
    g = torch.Generator().manual_seed(seed)
    w_base = torch.randn(out, inp, generator=g, dtype=torch.float64)
    w_fts = [
        w_base + 0.1 * torch.randn(out, inp, generator=g, dtype=torch.float64)
        for _ in range(2)
    ]
    xs = [
        torch.randn(tokens, inp, generator=g, dtype=torch.float64)
        * torch.logspace(0, -1, inp)
        for _ in range(2)
    ]
    return w_base, w_fts, [x.T @ x for x in xs]


def eq5(a, c, r):
    u, s, vh = torch.linalg.svd(a @ c, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r] @ torch.linalg.inv(c)


@pytest.mark.parametrize("target", ["weight", "delta"])
def test_purified_weight_factors_are_eq5(target):
    """left @ right = SVD_r(A C) C^{-1} with A = W_ft (weight) or dW (delta), explicit inverse."""
    from pave_plugins.core.purify import co_svd, purified_weight_factors

    w_base, (w_ft, _), (c, _) = _layer()
    dec = co_svd(w_ft, w_base, c, target=target)
    a = w_ft if target == "weight" else w_ft - w_base
    for r in (1, 3, 6):
        left, right = purified_weight_factors(dec, r)
        assert left.shape == (6, r) and right.shape == (r, 9)
        torch.testing.assert_close(left @ right, eq5(a, c, r), rtol=1e-9, atol=1e-10)


def test_layer_compute_dtype_is_used():
    """compute_dtype=float32 really computes in float32: the decompositions are float32 and the
    purified task vectors differ from float64's in the last bits (and agree to float32 accuracy)."""
    from pave_plugins.core.layer import layer_co_svds, purify_layer

    w_base, w_fts, covs = _layer(1)
    w_base, w_fts = w_base.float(), [w.float() for w in w_fts]
    decs = layer_co_svds(
        w_base, w_fts, covs, compute_dtype=torch.float32, names=["a", "b"]
    )
    assert all(d.u.dtype == torch.float32 for d in decs)
    p32 = purify_layer(w_base, w_fts, covs, rho=0.75, compute_dtype=torch.float32)
    p64 = purify_layer(w_base, w_fts, covs, rho=0.75)
    assert p32.ranks == p64.ranks
    for a, b in zip(p32.task_vectors, p64.task_vectors):
        assert a.dtype == b.dtype == torch.float32 and not torch.equal(a, b)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_spectrum_matrix_scales_each_singular_value():
    """eq. 8 by hand: anchor + U diag(lambda * sigma) V^T, for a Lambda that is not 1."""
    from pave_plugins.core import rethink as rt

    g = torch.Generator().manual_seed(2)
    anchor = torch.randn(5, 4, generator=g, dtype=torch.float64)
    delta = torch.randn(5, 4, generator=g, dtype=torch.float64)
    spec = rt.decompose_dense(delta, compute_dtype=torch.float64)
    lam = torch.tensor([0.5, 2.0, -1.0, 0.0], dtype=torch.float64)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    expect = anchor + u @ torch.diag(lam * s) @ vh
    torch.testing.assert_close(
        anchor + spec.matrix(lam), expect, rtol=0, atol=1e-12
    )

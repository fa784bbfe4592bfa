"""PAVE purification (eq. 5-8) against independent dense references with an explicit inverse."""

from __future__ import annotations

import pytest
import torch

from pave_plugins.core.purify import (
    activated_pruning_error,
    co_svd,
    prepare_covariance,
    purified_task_vector,
    purified_weight_factors,
    purify,
    purify_from_cosvd,
)


def reference_pave(w_ft, w_base, cov, rank, target="weight"):
    """Eq. 6 written literally in float64: SVD_r(A C) C^{-1} - W_base (explicit inverse)."""
    w_ft, w_base, cov = w_ft.double(), w_base.double(), cov.double()
    a = w_ft if target == "weight" else w_ft - w_base
    u, s, vh = torch.linalg.svd(a @ cov, full_matrices=False)
    head = (u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(cov)
    return head - w_base if target == "weight" else head


def make_case(out_f, in_f, tokens, seed, *, scale=1e-3, dtype=torch.float64, cond=None):
    g = torch.Generator().manual_seed(seed)
    w_base = torch.randn(out_f, in_f, generator=g, dtype=torch.float64) / in_f**0.5
    w_ft = w_base + scale * torch.randn(out_f, in_f, generator=g, dtype=torch.float64) / in_f**0.5
    x = torch.randn(tokens, in_f, generator=g, dtype=torch.float64)
    if cond is not None:
        # feature scales spanning sqrt(cond) give cond(C) ~ cond
        x = x * torch.logspace(0, 0.5 * torch.log10(torch.tensor(cond)).item(), in_f, dtype=torch.float64)
    cov = x.T @ x
    return w_ft.to(dtype), w_base.to(dtype), cov


def rel(a, b):
    return float(torch.linalg.matrix_norm(a.double() - b.double()) / torch.linalg.matrix_norm(b.double()))


@pytest.mark.parametrize("shape", [(24, 24), (16, 40), (40, 16)])
@pytest.mark.parametrize("target", ["weight", "delta"])
def test_full_rank_returns_plain_task_vector_fp32(shape, target):
    w_ft, w_base, cov = make_case(*shape, tokens=200, seed=1, dtype=torch.float32)
    tv = purified_task_vector(w_ft, w_base, cov, None, target=target)
    assert tv.dtype == torch.float32
    assert rel(tv, w_ft.double() - w_base.double()) <= 1e-5


@pytest.mark.parametrize("shape", [(24, 24), (16, 40), (40, 16)])
@pytest.mark.parametrize("target", ["weight", "delta"])
@pytest.mark.parametrize("fraction", [0.25, 0.75, 0.9])
def test_matches_explicit_inverse_reference(shape, target, fraction):
    w_ft, w_base, cov = make_case(*shape, tokens=300, seed=2, scale=0.3)
    rank = max(1, int(fraction * min(shape)))
    ours = purify(w_ft, w_base, cov, rank, target=target)
    ref = reference_pave(w_ft, w_base, cov, rank, target)
    assert ours.rank == rank and ours.full_rank == min(shape)
    assert ours.damping == 0.0
    assert rel(ours.task_vector, ref) < 1e-9
    dw = w_ft - w_base
    expected = float(torch.linalg.matrix_norm(ref - dw) / torch.linalg.matrix_norm(dw))
    assert ours.relative_change == pytest.approx(expected, rel=1e-8)


def test_realistic_small_task_vector_ill_conditioned_covariance():
    """dW ~ 1e-3 W and cond(C) ~ 1e6: float64 residual form vs a float64 reference."""
    w_ft, w_base, cov = make_case(48, 64, tokens=2000, seed=3, scale=1e-3, cond=1e6)
    evals = torch.linalg.eigvalsh(cov)
    assert 1e5 < float(evals[-1] / evals[0]) < 1e7
    rank = 42
    ref = reference_pave(w_ft, w_base, cov, rank)
    ours64 = purified_task_vector(w_ft, w_base, cov, rank)
    assert rel(ours64, ref) < 1e-6
    # float32 option: its error is measured (README) and must beat the naive float32 formula
    for cond, bound in ((1e4, 1e-4), (1e6, 0.1)):
        w_ft, w_base, cov = make_case(48, 64, tokens=2000, seed=3, scale=1e-3, cond=cond)
        ref = reference_pave(w_ft, w_base, cov, rank)
        wf, wb, c = w_ft.float(), w_base.float(), cov.float()
        err32 = rel(purified_task_vector(wf, wb, c, rank, compute_dtype=torch.float32), ref)
        u, s, vh = torch.linalg.svd(wf @ c, full_matrices=False)
        err_naive = rel((u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(c) - wb, ref)
        assert err32 < bound
        assert err32 < err_naive / 2
    # full rank in float32 inputs is exact to fp32 round-off
    full = purified_task_vector(wf, wb, cov, None)
    assert rel(full, wf.double() - wb.double()) < 1e-5


@pytest.mark.parametrize("kind", ["few_tokens", "duplicated_feature", "zero_feature"])
def test_singular_covariance_is_damped_and_reported(kind):
    g = torch.Generator().manual_seed(4)
    out_f, in_f = 12, 20
    w_base = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    w_ft = w_base + 0.1 * torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    if kind == "few_tokens":
        x = torch.randn(8, in_f, generator=g, dtype=torch.float64)
    else:
        x = torch.randn(100, in_f, generator=g, dtype=torch.float64)
        if kind == "duplicated_feature":
            x[:, 5] = x[:, 3]
        else:
            x[:, 7] = 0.0
    cov = x.T @ x
    prepared = prepare_covariance(cov)
    assert prepared.damping > 0.0
    assert prepared.relative_damping < 1e-3  # never a silent giant shift
    damped = cov + prepared.damping * torch.eye(in_f, dtype=torch.float64)
    for rank in (4, 10):
        res = purify(w_ft, w_base, cov, rank)
        assert res.damping == prepared.damping
        # the explicit-inverse reference itself loses ~eps * cond(C + damping I) ~ 1e-6 here
        ref = reference_pave(w_ft, w_base, damped, rank)
        assert rel(res.task_vector, ref) < 1e-4
        # with a larger damping the reference is accurate, and so must we be
        strong = prepare_covariance(cov, initial_relative_damping=1e-3)
        assert 1e-3 <= strong.relative_damping < 1e-2
        ref_strong = reference_pave(w_ft, w_base, strong.matrix, rank)
        assert rel(purify(w_ft, w_base, strong, rank).task_vector, ref_strong) < 1e-9
    full = purify(w_ft, w_base, cov, None)
    assert rel(full.task_vector, w_ft - w_base) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_upcast_and_come_back(dtype):
    w_ft, w_base, cov = make_case(16, 24, tokens=100, seed=5, scale=0.2)
    w_ft_h, w_base_h = w_ft.to(dtype), w_base.to(dtype)
    tv = purified_task_vector(w_ft_h, w_base_h, cov, 10)
    assert tv.dtype == dtype
    ref = reference_pave(w_ft_h.double(), w_base_h.double(), cov, 10)
    assert rel(tv, ref) < 1e-2  # limited only by the half-precision output rounding


def test_pruning_error_eq7_eq8_and_factors():
    w_ft, w_base, cov = make_case(20, 30, tokens=200, seed=6, scale=0.2)
    rank = 13
    dec = co_svd(w_ft, w_base, cov)
    res = purify_from_cosvd(dec, rank)
    dw = w_ft - w_base
    diff = (res.task_vector.double() - dw) @ cov  # eq. 7 left side
    smax = float(torch.linalg.matrix_norm(w_ft @ cov, ord=2))
    assert res.pruning_error == pytest.approx(float((diff**2).sum()) / smax**2, rel=1e-8)
    assert activated_pruning_error(dec.s, dec.full_rank) == 0.0
    # low-rank forms
    left, right = purified_weight_factors(dec, rank)
    u, s, vh = torch.linalg.svd(w_ft @ cov, full_matrices=False)
    assert rel(left @ right, (u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(cov)) < 1e-9
    assert rel(dw - res.tail_left @ res.tail_right, res.task_vector) < 1e-12
    # singular values are those of W_ft C (reused by Algorithm 1: one SVD)
    assert torch.allclose(dec.s, torch.linalg.svdvals(w_ft @ cov), rtol=1e-10)


def test_bad_inputs_raise_clear_errors():
    w_ft, w_base, cov = make_case(8, 12, tokens=50, seed=7)
    with pytest.raises(ValueError, match="differ in shape"):
        purify(w_ft, w_base[:, :10], cov)
    with pytest.raises(ValueError, match="inputs"):
        purify(w_ft, w_base, cov[:10, :10])
    with pytest.raises(ValueError, match="rank 0"):
        purify(w_ft, w_base, cov, 0)
    with pytest.raises(ValueError, match="outside"):
        purify(w_ft, w_base, cov, 9)
    bad = w_ft.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        purify(bad, w_base, cov)
    with pytest.raises(ValueError, match="all zero"):
        prepare_covariance(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="not symmetric"):
        prepare_covariance(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="negative"):
        prepare_covariance(-torch.eye(3))
    with pytest.raises(ValueError, match="target"):
        purify(w_ft, w_base, cov, target="bias")
    with pytest.raises(ValueError, match="2-D"):
        purify(w_ft[0], w_base[0], cov)

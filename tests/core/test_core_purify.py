"""PAVE purification (eq. 5-8) against independent dense references with an explicit inverse."""

from __future__ import annotations

import re

import pytest
import torch

from pave_plugins.core.purify import (
    activated_pruning_error,
    all_finite,
    co_svd,
    SEMIDEFINITE_TOLERANCE,
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


# ----------------------------------------------------------------------------- finer guards
@pytest.mark.parametrize(
    "t",
    [
        torch.tensor([1.0, float("nan")]),
        torch.tensor([float("inf")], dtype=torch.float64),
        torch.tensor([float("nan")], dtype=torch.float16),
        torch.tensor([[float("-inf")]], dtype=torch.bfloat16),
        torch.ones(3, 3),
        torch.full((100,), 60000.0, dtype=torch.float16),  # finite; its sum overflows float16
        torch.full((4,), 1e300, dtype=torch.float64),  # finite; would overflow a float32 sum
        torch.tensor([1e38, 3e38], dtype=torch.bfloat16),  # finite; overflows even a float32 sum
        torch.tensor([3e38, 3e38, float("nan")], dtype=torch.float32),  # overflowing sum, and a NaN
        torch.full((3,), 2e38, dtype=torch.float32),  # finite; its float32 sum overflows
        torch.empty(0),
        torch.tensor([1, 2, 3]),
        torch.tensor([True, False]),
    ],
)
def test_all_finite_is_isfinite_all(t):
    """One-reduction finiteness check == the definition, element by element (float64 for halves)."""
    expected = all(map(lambda v: abs(v) != float("inf") and v == v, t.double().flatten().tolist()))
    assert all_finite(t) is expected


def test_single_element_nan_is_refused():
    """A 1 x 1 layer with a NaN weight or covariance is refused like any other."""
    one = torch.ones(1, 1, dtype=torch.float64)
    nan = torch.full((1, 1), float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError, match="^w: fine-tuned weight contains NaN or Inf$"):
        co_svd(nan, one, one, name="w")
    with pytest.raises(ValueError, match="^w: base weight contains NaN or Inf$"):
        co_svd(one, nan, one, name="w")
    with pytest.raises(ValueError, match="^covariance of w: contains NaN or Inf$"):
        co_svd(one, one, nan, name="w")


def test_default_names_in_messages():
    """Errors name the weight (default ``weight``) and the covariance (default ``covariance``)."""
    w_ft, w_base, cov = make_case(4, 6, tokens=20, seed=8)
    dec = co_svd(w_ft, w_base, cov)
    with pytest.raises(ValueError, match=r"^weight: rank 0 is outside \[1, 4\] \(full rank of the layer\)$"):
        purify_from_cosvd(dec, 0)
    with pytest.raises(ValueError, match=r"^weight: rank 5 is outside \[1, 4\]"):
        purified_weight_factors(dec, 5)
    with pytest.raises(ValueError, match=r"^weight: rank 0 is outside"):
        purify(w_ft, w_base, cov, 0)
    with pytest.raises(ValueError, match=r"^weight: unknown purification target 'bias'"):
        co_svd(w_ft, w_base, cov, target="bias")
    with pytest.raises(ValueError, match=r"^covariance of weight: is all zero"):
        co_svd(w_ft, w_base, torch.zeros(6, 6))
    with pytest.raises(ValueError, match=r"^covariance: is all zero \(no tokens reached this layer\?\)$"):
        prepare_covariance(torch.zeros(6, 6))


def test_given_names_reach_every_message():
    w_ft, w_base, cov = make_case(4, 6, tokens=20, seed=8)
    with pytest.raises(ValueError, match=r"^q: rank 0 is outside"):
        purify(w_ft, w_base, cov, 0, name="q")
    with pytest.raises(ValueError, match=r"^q: rank 0 is outside"):
        purify_from_cosvd(co_svd(w_ft, w_base, cov), 0, name="q")
    with pytest.raises(ValueError, match=r"^q: fine-tuned weight \(4, 6\) and base weight \(4, 5\) differ in shape$"):
        purify(w_ft, w_base[:, :5], cov, name="q")
    with pytest.raises(ValueError, match=r"^covariance of q: is not symmetric"):
        purify(w_ft, w_base, cov + torch.triu(torch.ones(6, 6, dtype=torch.float64), 1), name="q")


@pytest.mark.parametrize("rank", [2.5, True, 2.0001])
def test_rank_must_be_an_integer(rank):
    w_ft, w_base, cov = make_case(4, 6, tokens=20, seed=8)
    with pytest.raises(ValueError, match=rf"^q: rank must be an integer, got {rank!r}$"):
        purify(w_ft, w_base, cov, rank, name="q")
    assert purify(w_ft, w_base, cov, 2.0).rank == 2  # an integral float is an integer


@pytest.mark.parametrize("shape", [(3, 4), (2, 2, 2), (4,)])
def test_covariance_must_be_square_2d(shape):
    message = f"c: expected a square 2-D matrix, got shape {tuple(shape)}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        prepare_covariance(torch.ones(shape), name="c")


def test_prepared_covariance_dtype_factor_and_symmetry_tolerance():
    """The prepared matrix is in the compute dtype; the Cholesky factor only when asked for
    (lower, L L^T = matrix); an exactly symmetric matrix passes a zero symmetry tolerance, and
    asymmetry equal to the tolerance passes too (it must exceed it)."""
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    cov32 = (x.T @ x).float()
    p = prepare_covariance(cov32)
    assert p.matrix.dtype == torch.float64 and p.factor is None and p.damping == 0.0
    assert torch.equal(p.matrix, cov32.double())
    p32 = prepare_covariance(cov32, compute_dtype=torch.float32, keep_factor=True)
    assert p32.matrix.dtype == torch.float32 and p32.factor is not None
    assert torch.equal(p32.factor, torch.tril(p32.factor))
    torch.testing.assert_close(p32.factor @ p32.factor.T, p32.matrix, rtol=1e-5, atol=1e-4)
    p64 = prepare_covariance(x.T @ x, keep_factor=True)
    torch.testing.assert_close(p64.factor.double() @ p64.factor.T, x.T @ x, rtol=1e-12, atol=1e-12)
    gram = x.T @ x
    exact = 0.5 * (gram + gram.T)  # bitwise symmetric (x^T x from a matmul need not be)
    assert torch.equal(exact, exact.T)
    assert prepare_covariance(exact, symmetry_tol=0.0).damping == 0.0
    edge = torch.tensor([[4.0, 1.0], [0.0, 4.0]], dtype=torch.float64)  # max|C - C^T| / max|C| = 1/4
    assert prepare_covariance(edge, symmetry_tol=0.25).damping == 0.0
    with pytest.raises(ValueError, match="not symmetric"):
        prepare_covariance(edge, symmetry_tol=0.2)


def test_diagonal_checks_and_their_tolerance():
    """A zero diagonal is not a covariance; a diagonal entry negative by round-off, up to
    1e-8 max|C| (inclusive), is accepted and damped away."""
    with pytest.raises(ValueError, match=r"not a covariance X X\^T$"):
        prepare_covariance(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match=r"negative diagonal"):
        prepare_covariance(torch.diag(torch.tensor([1.0, -1.1e-8], dtype=torch.float64)))
    for c in (
        torch.diag(torch.tensor([1.0, -1e-8], dtype=torch.float64)),  # exactly -1e-8 max|C|
        torch.diag(torch.tensor([100.0, -1e-7], dtype=torch.float64)),  # -1e-9 max|C|
    ):
        p = prepare_covariance(c)
        assert p.damping > -float(c.diagonal().min())
        assert float(torch.linalg.eigvalsh(p.matrix).min()) > 0


def doubling_damping(c, initial, maximum):
    """Sec. 3.2 damping, independently: the first of initial * 2^k * mean(diag C), k = 0, 1, ...
    (at most maximum * mean(diag C)) that makes C + damping I numerically positive definite
    (smallest eigenvalue above n eps max diag); None if there is none."""
    c = c.double()
    mean = float(c.diagonal().mean())
    n, eps = c.shape[0], torch.finfo(torch.float64).eps
    if float(torch.linalg.eigvalsh(c).min()) > n * eps * float(c.diagonal().max()):
        return 0.0
    rel = initial
    while rel <= maximum:
        d = rel * mean
        shifted = c + d * torch.eye(n, dtype=torch.float64)
        if float(torch.linalg.eigvalsh(shifted).min()) > n * eps * float(shifted.diagonal().max()):
            return d
        rel *= 2
    return None


@pytest.mark.parametrize(
    ("c", "initial", "maximum"),
    [
        # float32, smallest eigenvalue -0.0075 x mean diag (within float32's round-off allowance of
        # 1e-2): 26 doublings from 1e-10 to 0.0067 fail, 0.0134 succeeds
        (torch.tensor([[1.0, 1.0075], [1.0075, 1.0]]), 1e-10, 1.0),
        # needs exactly max_relative_damping x mean diag: 0.005 fails, 0.01 succeeds (inclusive)
        (torch.tensor([[1.0, 1.0075], [1.0075, 1.0]]), 0.005, 0.01),
        # singular PSD, mean diag 2: the first damping is exactly 1.0
        (torch.tensor([[2.0, 2.0], [2.0, 2.0]]), 0.5, 1.0),
        # positive definite with cond 1e13 < 1 / (n eps): no damping
        (torch.diag(torch.tensor([1.0, 1e-13])), 1e-10, 1.0),
        # smallest pivot^2 exactly n eps max diag (4 x 2^-52 = 2^-50): numerically singular
        (torch.diag(torch.tensor([1.0, 1.0, 1.0, 2.0**-50])), 1e-10, 1.0),
    ],
)
def test_damping_doubles_from_the_initial_value(c, initial, maximum):
    stored, c = c, c.double()  # the allowance for round-off below zero is the stored dtype's
    expected = doubling_damping(c, initial, maximum)
    p = prepare_covariance(stored, initial_relative_damping=initial, max_relative_damping=maximum)
    assert p.damping == pytest.approx(expected, rel=1e-12, abs=0)
    assert p.relative_damping == pytest.approx(expected / float(c.diagonal().mean()), rel=1e-12, abs=0)
    assert torch.equal(p.matrix, c + p.damping * torch.eye(c.shape[0], dtype=torch.float64))


def test_damping_beyond_the_maximum_is_refused():
    c = torch.tensor([[1.0, 1.0075], [1.0075, 1.0]], dtype=torch.float32)
    with pytest.raises(ValueError, match=r"^covariance: not positive definite even with damping 0.005 \(0.005 x mean"):
        prepare_covariance(c, initial_relative_damping=0.0025, max_relative_damping=0.005)


@pytest.mark.parametrize(("dtype", "smallest"), [(torch.float64, -2e-4), (torch.float64, -0.55), (torch.float32, -0.02),
                                                 (torch.float16, -0.2)])
def test_an_indefinite_matrix_is_refused_not_damped(dtype, smallest):
    """X X^T has no negative eigenvalue: beyond round-off (1e-4, 1e-2, 0.1 x mean diag for float64,
    float32, half) the matrix is refused, whatever damping would make it pass."""
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    eig = torch.tensor([smallest, 0.5, 1.0, 1.5, 1.0, 2.0 - smallest], dtype=torch.float64)  # mean 1
    c = ((q * eig) @ q.T).to(dtype)
    mean = float(c.double().diagonal().mean())
    with pytest.raises(ValueError, match=r"^cov\.3: is not positive semi-definite \(smallest eigenvalue -[0-9.e-]+ x mean"):
        prepare_covariance(c, name="cov.3")
    assert float(torch.linalg.eigvalsh(c.double())[0]) / mean < -SEMIDEFINITE_TOLERANCE.get(dtype, 0.1)


def test_damping_is_logged(caplog):
    """A damped covariance is logged at debug level with its damping; an undamped one is not."""
    import logging

    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    with caplog.at_level(logging.DEBUG, logger="pave_plugins.core.purify"):
        prepare_covariance(x.T @ x, name="fine")
        assert caplog.records == []
        p = prepare_covariance(torch.tensor([[2.0, 2.0], [2.0, 2.0]]), initial_relative_damping=0.25, name="c")
    assert p.damping == 0.5
    assert [r.getMessage() for r in caplog.records] == ["c: singular, damped with 0.5 (0.25 x mean diag)"]


def test_relative_damping_reaches_the_results():
    """relative_damping = damping / mean(diag C) on the decomposition and on the purification."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)  # 3 tokens, 6 features: singular
    cov = x.T @ x
    w_base = torch.randn(4, 6, generator=g, dtype=torch.float64)
    w_ft = w_base + 0.1 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    res = purify(w_ft, w_base, cov, 2)
    assert res.damping > 0
    assert res.relative_damping == pytest.approx(res.damping / float(cov.diagonal().mean()), rel=1e-12)
    assert co_svd(w_ft, w_base, cov).relative_damping == res.relative_damping


def test_covariance_is_prepared_in_the_compute_dtype():
    """diag(1, 1e-9) is well conditioned in float64 (no damping) but numerically singular in
    float32 (1e-9 < 2 eps_32): co_svd prepares a raw covariance in its compute dtype, and converts
    a covariance prepared in another dtype to it."""
    w_ft = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    w_base = torch.zeros(2, 2)
    cov32 = torch.diag(torch.tensor([1.0, 1e-9]))
    assert co_svd(w_ft, w_base, cov32).damping == 0.0
    d32 = co_svd(w_ft, w_base, cov32, compute_dtype=torch.float32)
    assert d32.damping > 0 and d32.u.dtype == torch.float32
    prepared32 = prepare_covariance(cov32, compute_dtype=torch.float32)
    dec = co_svd(w_ft.double(), w_base.double(), prepared32, compute_dtype=torch.float64)
    assert dec.u.dtype == torch.float64 and dec.s.dtype == torch.float64
    c = prepared32.matrix.double()
    torch.testing.assert_close(dec.s, torch.linalg.svdvals(w_ft.double() @ c), rtol=1e-12, atol=0)


def test_mixed_input_dtypes_compute_in_the_compute_dtype():
    """A float64 base with a float32 fine-tune and compute_dtype=float32: everything is float32,
    also the task vector of target delta (which is decomposed)."""
    w_ft, w_base, cov = make_case(6, 8, tokens=40, seed=12, scale=0.3)
    ft32 = w_ft.float()
    for target in ("weight", "delta"):
        dec = co_svd(ft32, w_base, cov, target=target, compute_dtype=torch.float32)
        assert dec.delta.dtype == dec.w_ft.dtype == dec.u.dtype == torch.float32
        res = purify_from_cosvd(dec, 3)
        ref = reference_pave(ft32.double(), w_base.float().double(), cov, 3, target)
        assert res.task_vector.dtype == torch.float32 and rel(res.task_vector, ref) < 1e-4


def test_compute_dtype_and_target_reach_the_computation():
    """purify / purified_task_vector pass compute_dtype and target on: float32 computes in float32
    (close to, but not bit-equal with, float64), target delta truncates dW C, not W_ft C."""
    w_ft, w_base, cov = make_case(10, 12, tokens=60, seed=13, scale=0.3)
    wf, wb, c = w_ft.float(), w_base.float(), cov.float()
    p32 = purify(wf, wb, c, 5, compute_dtype=torch.float32)
    assert p32.singular_values.dtype == torch.float32 and p32.tail_left.dtype == torch.float32
    tv32 = purified_task_vector(wf, wb, c, 5, compute_dtype=torch.float32)
    tv64 = purified_task_vector(wf, wb, c, 5)
    ref = reference_pave(wf.double(), wb.double(), c.double(), 5)
    assert not torch.equal(tv32, tv64)
    assert rel(tv32, ref) < 1e-4 and rel(tv64, ref) < 1e-6
    ref_delta = reference_pave(w_ft, w_base, cov, 5, "delta")
    assert rel(purified_task_vector(w_ft, w_base, cov, 5, target="delta"), ref_delta) < 1e-9
    assert rel(ref_delta, ref) > 1e-3  # the two targets really differ here


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (6, 6)])
def test_decomposition_and_tail_shapes(shape):
    """U is out x R and S has R values (R = min(out, in)), with the singular values of W C; the
    low-rank tail has rank R - r: dW_PAVE = dW - tail_left @ tail_right."""
    out_f, in_f = shape
    full = min(shape)
    w_ft, w_base, cov = make_case(out_f, in_f, tokens=40, seed=14, scale=0.3)
    dec = co_svd(w_ft, w_base, cov)
    assert dec.u.shape == (out_f, full) and dec.s.shape == (full,)
    torch.testing.assert_close(dec.u.T @ dec.u, torch.eye(full, dtype=torch.float64), rtol=0, atol=1e-12)
    res = purify_from_cosvd(dec, 2)
    assert res.tail_left.shape == (out_f, full - 2) and res.tail_right.shape == (full - 2, in_f)
    torch.testing.assert_close(res.singular_values, torch.linalg.svdvals(w_ft @ cov), rtol=1e-10, atol=0)
    ref = reference_pave(w_ft, w_base, cov, 2)
    assert rel(res.task_vector, ref) < 1e-9
    assert rel(w_ft - w_base - res.tail_left @ res.tail_right, ref) < 1e-9


def test_pruning_error_definition_edges():
    """eq. 8, sum_{j > r} (sigma_j / sigma_max)^2, also when sigma_max is 1; 0 for an empty or an
    all-zero spectrum (nothing is lost)."""
    s = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    assert activated_pruning_error(s, 1) == pytest.approx(0.25 + 0.0625, rel=1e-15)
    assert activated_pruning_error(2 * s, 2) == pytest.approx(0.0625, rel=1e-15)
    assert activated_pruning_error(torch.zeros(3), 1) == 0.0
    assert activated_pruning_error(torch.empty(0), 0) == 0.0
    zero_ft = torch.zeros(3, 4, dtype=torch.float64)
    res = purify(zero_ft, torch.ones(3, 4, dtype=torch.float64), torch.eye(4, dtype=torch.float64), 1)
    assert res.pruning_error == 0.0 and res.relative_change == 0.0

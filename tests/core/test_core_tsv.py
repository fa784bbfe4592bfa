"""TSV-M / TSV-C / STI against a literal float64 transcription of the TSV paper and FusionBench."""

from __future__ import annotations

import pytest
import torch

from pave_plugins.core.tsv import mean_task_vector, sti, tsv_compress, tsv_merge


def literal_tsv_m(task_matrices, alpha=1.0):
    """TSV Algorithm 1, line by line, float64, full SVDs."""
    T = len(task_matrices)
    us, ss, vs = [], [], []
    for d in task_matrices:  # lines 1-4
        u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
        k = s.numel() // T  # "first 1/T singular components"
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    U, S, V = torch.cat(us, 1), torch.diag(torch.cat(ss)), torch.cat(vs, 1)  # lines 5-8
    pu, _, qu = torch.linalg.svd(U, full_matrices=False)  # lines 9-11
    pv, _, qv = torch.linalg.svd(V, full_matrices=False)
    u_perp, v_perp = pu @ qu, pv @ qv  # lines 12-14
    return alpha * u_perp @ S @ v_perp.T  # lines 15-18


def task_matrices(T, m, n, seed, dtype=torch.float32, decay=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(T):
        a = torch.randn(m, n, generator=g, dtype=torch.float64)
        if decay:  # realistic decaying spectra keep the top-k subspace well separated
            u, s, vh = torch.linalg.svd(a, full_matrices=False)
            s = s * torch.exp(-torch.arange(s.numel(), dtype=torch.float64) / 4)
            a = (u * s) @ vh
        out.append((1e-2 * a).to(dtype))
    return out


def rel(a, b):
    return float(torch.linalg.matrix_norm(a.double() - b.double()) / torch.linalg.matrix_norm(b.double()))


@pytest.mark.parametrize("T,m,n", [(2, 20, 20), (3, 24, 40), (4, 48, 16), (8, 32, 32)])
def test_tsv_merge_matches_literal_algorithm(T, m, n):
    tms = task_matrices(T, m, n, seed=T * 10 + m)
    ours = tsv_merge(tms, alpha=1.5)
    assert ours.dtype == torch.float32 and ours.shape == (m, n)
    assert rel(ours, literal_tsv_m(tms, alpha=1.5)) < 1e-5


def test_tsv_merge_matches_fusion_bench():
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
        compute_and_sum_svd_mem_reduction,
    )

    tms = task_matrices(3, 40, 56, seed=5)
    biases = [torch.randn(40) for _ in range(3)]
    ref = compute_and_sum_svd_mem_reduction(
        [{"w": t, "b": b} for t, b in zip(tms, biases)], accelerator="cpu"
    )
    assert rel(tsv_merge(tms), ref["w"]) < 1e-5
    assert torch.allclose(mean_task_vector(biases), ref["b"], atol=1e-6)


def test_single_task_is_identity_and_duplicates_stay_finite():
    (t,) = task_matrices(1, 16, 24, seed=1)
    assert rel(tsv_merge([t]), t) < 1e-5  # k = R, U and V already orthonormal
    # duplicated tasks: U^T U is singular and P Q^T not unique; the canonical (pseudo-inverse)
    # polar factor makes "the same task twice" merge like that task once, with k = R // 2
    dup = tsv_merge([t, t])
    u, s, vh = torch.linalg.svd(t.double(), full_matrices=False)
    assert rel(dup, (u[:, :8] * s[:8]) @ vh[:8]) < 1e-5
    zero = tsv_merge([torch.zeros(8, 8), torch.zeros(8, 8)])
    assert torch.count_nonzero(zero) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    tms = task_matrices(3, 24, 24, seed=2, dtype=dtype)
    out = tsv_merge(tms)
    assert out.dtype == dtype
    assert rel(out, literal_tsv_m([t.double() for t in tms])) < 1e-2


def test_sti_zero_on_orthogonal_subspaces_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    q_left, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    q_right, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    tasks = []
    for i in range(3):  # task i lives on columns 10i..10i+9: mutually orthogonal TSVs
        u, v = q_left[:, 10 * i : 10 * i + 5], q_right[:, 10 * i : 10 * i + 5]
        s = torch.linspace(3, 1, 5, dtype=torch.float64)
        tasks.append((u * s) @ v.T)
    assert sti(tasks, k=5) == pytest.approx(0.0, abs=1e-10)
    overlapping = task_matrices(3, 30, 40, seed=3, dtype=torch.float64)
    assert sti(overlapping) > 1e-3


def test_sti_matches_definition():
    tms = task_matrices(2, 6, 8, seed=4, dtype=torch.float64)
    us, ss, vs = [], [], []
    for t in tms:
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        us.append(u), ss.append(s), vs.append(vh.T)
    U, S, V = torch.cat(us, 1), torch.diag(torch.cat(ss)), torch.cat(vs, 1)
    eye = torch.eye(U.shape[1], dtype=torch.float64)
    expected = float(((U.T @ U - eye) @ S @ (V.T @ V - eye)).abs().sum())
    assert sti(tms) == pytest.approx(expected, rel=1e-10)


def test_tsv_compress_is_truncated_svd():
    (t,) = task_matrices(1, 20, 30, seed=6, dtype=torch.float64)
    left, right = tsv_compress(t, 4)
    u, s, vh = torch.linalg.svd(t, full_matrices=False)
    assert rel(left @ right, (u[:, :4] * s[:4]) @ vh[:4]) < 1e-10
    with pytest.raises(ValueError):
        tsv_compress(t, 0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least one"):
        tsv_merge([])
    with pytest.raises(ValueError, match="shape"):
        tsv_merge([torch.zeros(3, 4), torch.zeros(4, 3)])
    with pytest.raises(ValueError, match="2-D"):
        tsv_merge([torch.zeros(3)])
    with pytest.raises(ValueError, match="NaN"):
        tsv_merge([torch.full((3, 3), float("nan"))])


def test_low_rank_tasks_in_orthogonal_subspaces_merge_to_their_exact_sum():
    # TSV's premise: tasks whose singular subspaces do not overlap do not interfere, so TSV-M
    # (alpha = 1) must return the plain sum. Rank 3 < k = 24 / 2: the null triplets are dropped
    # (an arbitrary completion of them would rotate the real ones in the Procrustes step).
    g = torch.Generator().manual_seed(0)
    q_left, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))
    q_right, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    tasks = [(q_left[:, 3 * i:3 * i + 3] * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
             @ q_right[:, 3 * i:3 * i + 3].T for i in range(2)]
    merged = tsv_merge(tasks)
    assert rel(merged, tasks[0] + tasks[1]) < 1e-10
    # TSV-C of a rank-3 matrix at k = 5: shapes kept, reconstruction exact
    left, right = tsv_compress(tasks[0], 5)
    assert left.shape == (24, 5) and right.shape == (5, 32)
    assert rel(left @ right, tasks[0]) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_triplets_are_orthonormal_in_both_compute_dtypes(dtype):
    # rank 8 < k = 20: only the 8 real triplets come back, orthonormal on both sides, and they
    # reconstruct the matrix (a float32 Gram cannot resolve s below ~sqrt(eps) s_1: those are cut)
    from pave_plugins.core.tsv import top_singular_triplets

    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 100, generator=g, dtype=torch.float64)
    u, s, v = top_singular_triplets(a, 20, compute_dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert s.numel() == 8
    eye = torch.eye(8, dtype=dtype)
    assert (u.T @ u - eye).abs().max() < tol and (v.T @ v - eye).abs().max() < tol
    assert rel((u * s) @ v.T, a) < tol


def _sti_numpy(mats, ranks):
    """Eq. 7 written out with numpy, each task's SVD cut at its known rank (independent of torch)."""
    import numpy as np

    us, ss, vs = [], [], []
    for m, r in zip(mats, ranks):
        u, s, vh = np.linalg.svd(m, full_matrices=False)
        us.append(u[:, :r]), ss.append(s[:r]), vs.append(vh[:r].T)
    u, s, v = np.concatenate(us, 1), np.diag(np.concatenate(ss)), np.concatenate(vs, 1)
    eye = np.eye(u.shape[1])
    return float(np.abs((u.T @ u - eye) @ s @ (v.T @ v - eye)).sum())


def test_sti_drops_null_triplets_of_rank_deficient_tasks():
    """Two rank-10 20 x 20 tasks in orthogonal subspaces do not interfere: STI ~ 0 (the null
    triplets' arbitrary completion used to score ~77); rank-deficient overlapping tasks match eq. 7
    over their non-null triplets."""
    import numpy as np

    rng = np.random.default_rng(0)
    q_left, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    q_right, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    a = (q_left[:, :10] * rng.uniform(1, 2, 10)) @ q_right[:, :10].T
    b = (q_left[:, 10:] * rng.uniform(1, 2, 10)) @ q_right[:, 10:].T
    assert _sti_numpy([a, b], [10, 10]) < 1e-10  # the independent computation: no interference
    got = sti([torch.from_numpy(a), torch.from_numpy(b)])
    assert got == pytest.approx(0.0, abs=1e-9)
    full = _sti_numpy([a, b], [20, 20])  # all 20 triplets of each, as before the fix
    assert full > 1.0
    c = rng.standard_normal((20, 7)) @ rng.standard_normal((7, 20))  # overlapping, rank 7 and 10
    expected = _sti_numpy([a, c], [10, 7])
    assert expected > 1.0
    assert sti([torch.from_numpy(a), torch.from_numpy(c)]) == pytest.approx(expected, rel=1e-8)
    # the null-triplet threshold is TSV-M's: a truncated k above the rank keeps only the rank
    assert sti([torch.from_numpy(a), torch.from_numpy(c)], k=15) == pytest.approx(expected, rel=1e-8)


# ---------------------------------------------------------------------------------------------
# Boundary cases found unguarded by mutation testing: per-task k, tiny layers, the null-triplet
# cut of each compute dtype, TSV-C's k range, Procrustes on arbitrary inputs, dtypes and messages.
# Every expectation is the paper's definition (or the documented rule) written out in float64.


def _cut(dtype):
    """The documented null-triplet threshold, 10 sqrt(eps) of the compute dtype (relative to s_1)."""
    return 10.0 * torch.finfo(dtype).eps ** 0.5


def literal_tsv_m_k(task_matrices, k, alpha=1.0, cut=0.0):
    """TSV Algorithm 1 with an explicit per-task k, float64 SVDs; triplets with s <= cut * s_1 dropped."""
    us, ss, vs = [], [], []
    for d in task_matrices:
        u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
        kk = min(k, int((s > cut * s[0]).sum()))
        us.append(u[:, :kk]), ss.append(s[:kk]), vs.append(vh[:kk].T)
    U, S, V = torch.cat(us, 1), torch.diag(torch.cat(ss)), torch.cat(vs, 1)
    pu, _, qu = torch.linalg.svd(U, full_matrices=False)
    pv, _, qv = torch.linalg.svd(V, full_matrices=False)
    return alpha * (pu @ qu) @ S @ (pv @ qv).T


def _with_spectrum(m, n, s, seed):
    """An m x n float64 matrix with exactly the singular values ``s`` (random orthonormal bases)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.as_tensor(s, dtype=torch.float64)
    q_left, _ = torch.linalg.qr(torch.randn(m, s.numel(), generator=g, dtype=torch.float64))
    q_right, _ = torch.linalg.qr(torch.randn(n, s.numel(), generator=g, dtype=torch.float64))
    return (q_left * s) @ q_right.T


@pytest.mark.parametrize("k", [1, 2, 5])
def test_explicit_k_is_the_per_task_truncation(k):
    tms = task_matrices(3, 20, 26, seed=11, dtype=torch.float64)
    assert rel(tsv_merge(tms, alpha=0.7, k=k), literal_tsv_m_k(tms, k, alpha=0.7)) < 1e-10
    from pave_plugins.core.tsv import concatenated_task_singular_vectors

    f = concatenated_task_singular_vectors(tms, k)
    assert f.k == k and f.u.shape == (20, 3 * k) and f.v.shape == (26, 3 * k) and f.s.shape == (3 * k,)
    assert concatenated_task_singular_vectors(tms).k == 20 // 3  # default: floor(R / T)


def test_one_component_per_task_and_rank_one_layers():
    # T = R: k = floor(R / T) = 1, one singular triplet per task
    tms = task_matrices(6, 6, 9, seed=12, dtype=torch.float64)
    assert rel(tsv_merge(tms), literal_tsv_m_k(tms, 1)) < 1e-10
    # one task of a 1 x n (or m x 1) layer: k = 1 and TSV-M of one task is that task
    for shape in [(1, 7), (7, 1)]:
        t = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        assert rel(tsv_merge([t]), t) < 1e-12
    # a rank-1 task with room for more components: its single triplet, nothing else
    r1 = _with_spectrum(8, 10, [2.0], seed=4)
    assert rel(tsv_merge([r1]), r1) < 1e-12


def test_layer_too_small_for_the_tasks_merges_to_zero():
    # T > R: k = floor(R / T) = 0, nothing survives truncation (Algorithm 1 with k = 0): a zero
    # update of the layer's shape and the first task's dtype
    for dtype in (torch.float64, torch.float16):
        tms = task_matrices(3, 2, 5, seed=13, dtype=dtype)
        out = tsv_merge(tms)
        assert out.shape == (2, 5) and out.dtype == dtype and torch.count_nonzero(out) == 0
    from pave_plugins.core.tsv import top_singular_triplets

    u, s, v = top_singular_triplets(torch.ones(4, 6), 0)
    assert u.shape == (4, 0) and s.shape == (0,) and v.shape == (6, 0)
    assert u.dtype == s.dtype == v.dtype == torch.float64


def test_null_triplet_threshold_is_ten_sqrt_eps():
    """``nonnull_count``: s_i > 10 sqrt(eps) s_1 (strict), in the dtype of ``s``."""
    from pave_plugins.core.tsv import nonnull_count

    def count(s):  # the documented rule, written out
        return 0 if s.numel() == 0 or not s[0] > 0 else sum(float(x) > _cut(s.dtype) * float(s[0]) for x in s)

    c64, c32 = _cut(torch.float64), _cut(torch.float32)
    cases = [
        torch.tensor([1.0, 1.05 * c64, 0.95 * c64, 0.0], dtype=torch.float64),  # 10 sqrt(eps), not 11
        torch.tensor([1.0, c64], dtype=torch.float64),  # exactly at the cut: null (strict >)
        torch.tensor([1.0, 1e-3, 1e-8], dtype=torch.float64),  # relative to s_1, not s_2
        torch.tensor([3.0], dtype=torch.float64),
        torch.tensor([0.0, 0.0], dtype=torch.float64),
        torch.zeros(0, dtype=torch.float64),
        torch.tensor([1.0, 1e-2, 1e-3, 1e-5], dtype=torch.float32),  # float32: 3.5e-3
    ]
    expected = [2, 1, 2, 1, 0, 0, 2]
    assert [count(s) for s in cases] == expected  # the reference agrees with the hand count
    assert [nonnull_count(s) for s in cases] == expected
    assert c32 > 1e-3 > c64


def test_zero_and_rank_deficient_tasks_in_tsv_c():
    # a zero task has no triplet: TSV-C gives finite zero factors of the stored shape
    left, right = tsv_compress(torch.zeros(5, 7), 3)
    assert left.shape == (5, 3) and right.shape == (3, 7)
    assert torch.count_nonzero(left) == 0 and torch.count_nonzero(right) == 0
    from pave_plugins.core.tsv import top_singular_triplets

    u, s, v = top_singular_triplets(torch.zeros(5, 7), 3)
    assert s.numel() == 0 and u.shape == (5, 0) and v.shape == (7, 0)
    # rank 1 at k = 3: the one triplet, reconstruction exact
    r1 = _with_spectrum(6, 9, [1.5], seed=5)
    left, right = tsv_compress(r1, 3)
    assert rel(left @ right, r1) < 1e-12


@pytest.mark.parametrize("k", [1, 6])
def test_tsv_c_at_both_ends_of_the_k_range(k):
    (t,) = task_matrices(1, 6, 11, seed=7, dtype=torch.float64)
    left, right = tsv_compress(t, k)
    u, s, vh = torch.linalg.svd(t, full_matrices=False)
    assert left.shape == (6, k) and right.shape == (k, 11)
    assert rel(left @ right, (u[:, :k] * s[:k]) @ vh[:k]) < 1e-10
    with pytest.raises(ValueError, match=r"^k=7 is outside \[1, 6\]$"):
        tsv_compress(t, 7)
    with pytest.raises(ValueError, match=r"^k=0 is outside \[1, 6\]$"):
        tsv_compress(t, 0)
    with pytest.raises(ValueError, match=r"^TSV-C compresses 2-D task matrices, got shape \(6,\)$"):
        tsv_compress(t[:, 0], 1)


def test_tsv_c_compute_and_output_dtypes():
    """float32 input: factors in float32; the SVD in float64 by default (a 1e-4 s_1 component is
    resolved and kept), in float32 when asked (below 10 sqrt(eps32) s_1 = 3.5e-3 s_1: dropped)."""
    spectrum = [1.0, 0.5, 0.25, 1e-4]
    t64 = _with_spectrum(12, 16, spectrum, seed=8)
    t = t64.float()
    left, right = tsv_compress(t, 4)
    assert left.dtype == right.dtype == torch.float32
    assert rel(left @ right, t) < 1e-6  # all four kept (float64 SVD)
    left32, right32 = tsv_compress(t, 4, compute_dtype=torch.float32)
    assert left32.shape == (12, 4) and right32.shape == (4, 16)
    u, s, vh = torch.linalg.svd(t.double(), full_matrices=False)
    top3 = (u[:, :3] * s[:3]) @ vh[:3]
    assert rel(left32 @ right32, top3) < 1e-5  # the 1e-4 triplet is below the float32 cut
    assert rel(top3, t) > 5e-5


def test_compute_dtype_reaches_the_decompositions_of_tsv_m():
    """float32 decompositions cut triplets at 10 sqrt(eps32) s_1 (3.5e-3 s_1), float64 ones at
    1.5e-7 s_1: tasks with a 1e-3 s_1 component within the top k merge differently."""
    from pave_plugins.core.tsv import concatenated_task_singular_vectors

    spectrum = [1.0, 0.6, 0.3, 1e-3]
    tms = [_with_spectrum(10, 14, spectrum, seed=20 + i) for i in range(2)]  # k = 5 >= rank 4
    f32 = concatenated_task_singular_vectors(tms, compute_dtype=torch.float32)
    assert f32.u.dtype == torch.float32 and f32.s.numel() == 6
    assert concatenated_task_singular_vectors(tms).s.numel() == 8
    ref32 = literal_tsv_m_k(tms, 5, cut=_cut(torch.float32))
    ref64 = literal_tsv_m_k(tms, 5, cut=_cut(torch.float64))
    assert rel(ref32, ref64) > 1e-4
    assert rel(tsv_merge(tms, compute_dtype=torch.float32), ref32) < 1e-5
    assert rel(tsv_merge(tms), ref64) < 1e-10


def test_merge_tsv_factors_defaults_and_dtypes():
    """Streaming entry point: alpha defaults to 1, decompositions in float64 even from float32
    factors, output in the factors' dtype unless ``out_dtype`` is given."""
    from pave_plugins.core.tsv import TSVFactors, concatenated_task_singular_vectors, merge_tsv_factors

    tms = task_matrices(3, 16, 20, seed=21, dtype=torch.float64)
    assert rel(merge_tsv_factors(concatenated_task_singular_vectors(tms)), literal_tsv_m_k(tms, 5)) < 1e-10
    f = concatenated_task_singular_vectors(tms)
    f32 = TSVFactors(u=f.u.float(), s=f.s.float(), v=f.v.float(), k=f.k)
    # reference: Algorithm 1's steps 3-4 on exactly these float32 factors, in float64
    pu, _, qu = torch.linalg.svd(f32.u.double(), full_matrices=False)
    pv, _, qv = torch.linalg.svd(f32.v.double(), full_matrices=False)
    ref = 0.5 * (pu @ qu) @ torch.diag(f32.s.double()) @ (pv @ qv).T
    out64 = merge_tsv_factors(f32, 0.5, out_dtype=torch.float64)
    assert out64.dtype == torch.float64 and rel(out64, ref) < 1e-12
    out = merge_tsv_factors(f32, 0.5)
    assert out.dtype == torch.float32 and rel(out, ref) < 1e-6


def _polar(x):
    """P Q^T of x = P D Q^T over the singular values above 1e-6 s_1 (1e-12 relative on x^T x):
    the SVD polar factor, the canonical partial isometry when x is rank deficient."""
    p, d, qh = torch.linalg.svd(x.double(), full_matrices=False)
    r = int((d > 1e-6 * d[0]).sum()) if d.numel() and d[0] > 0 else 0
    return p[:, :r] @ qh[:r]


def test_procrustes_is_the_polar_factor_at_any_scale():
    from pave_plugins.core.tsv import procrustes_orthogonalize

    g = torch.Generator().manual_seed(30)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64)
    col = torch.randn(7, 1, generator=g, dtype=torch.float64)
    deficient = torch.cat([x, x[:, :2] @ torch.randn(2, 2, generator=g, dtype=torch.float64)], 1)
    for scale in (1e-7, 1e-3, 1.0, 1e3):  # P Q^T of c x is P Q^T of x
        for a in (x, 3.0 * col, deficient):
            assert rel(procrustes_orthogonalize(scale * a), _polar(a)) < 1e-8
    zero = procrustes_orthogonalize(torch.zeros(5, 2, dtype=torch.float64))
    assert zero.shape == (5, 2) and torch.count_nonzero(zero) == 0
    # float32: a direction at 2.8e-3 of the largest (above float32 round-off) is orthogonalised, not
    # dropped; exact columns so x^T x is diagonal: diag(1, 7.7e-6), just above 64 eps32
    x32 = torch.zeros(3, 2, dtype=torch.float32)
    x32[0, 0], x32[2, 1] = 1.0, 7.7e-6**0.5
    assert rel(procrustes_orthogonalize(x32), _polar(x32)) < 1e-6


def test_sti_truncated_at_k_matches_eq_7():
    tms = [t.numpy() for t in task_matrices(3, 12, 15, seed=31, dtype=torch.float64)]
    for k in (2, 4):
        expected = _sti_numpy(tms, [k] * 3)
        assert expected > 1e-4
        assert sti([torch.from_numpy(t) for t in tms], k=k) == pytest.approx(expected, rel=1e-9)
    assert sti([torch.from_numpy(t) for t in tms]) == pytest.approx(_sti_numpy(tms, [12] * 3), rel=1e-9)


def test_mean_task_vector_definition_and_dtypes():
    g = torch.Generator().manual_seed(32)
    tv64 = [torch.randn(7, generator=g, dtype=torch.float64) for _ in range(3)]
    ref = 0.4 * (tv64[0] + tv64[1] + tv64[2]) / 3
    out = mean_task_vector(tv64, 0.4)
    assert out.dtype == torch.float64 and float((out - ref).abs().max()) < 1e-15  # float64 stays float64
    assert torch.equal(mean_task_vector(tv64[:1]), tv64[0])  # one task: itself
    # float16: accumulated in float32 (a float16 sum of 3 x 40000 would overflow), returned in float16
    big = [torch.full((4,), 40000.0, dtype=torch.float16)] * 3
    out16 = mean_task_vector(big)
    assert out16.dtype == torch.float16 and torch.equal(out16, big[0])
    mixed = mean_task_vector([torch.ones(3, dtype=torch.float16), torch.ones(3, dtype=torch.float32)])
    assert mixed.dtype == torch.float16  # the first task's dtype
    with pytest.raises(ValueError, match=r"^need at least one task vector$"):
        mean_task_vector([])
    with pytest.raises(ValueError, match=r"^task vectors differ in shape: \(4,\) vs \(3,\)$"):
        mean_task_vector([torch.ones(3), torch.ones(4)])


def test_no_task_messages():
    from pave_plugins.core.tsv import components_per_task

    for call in (lambda: tsv_merge([]), lambda: sti([]), lambda: components_per_task(8, 0)):
        with pytest.raises(ValueError, match=r"^TSV needs at least one task matrix$"):
            call()
    assert components_per_task(10, 3) == 3 and components_per_task(2, 3) == 0

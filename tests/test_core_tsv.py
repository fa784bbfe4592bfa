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

"""Task Singular Vectors (Gargiulo et al., CVPR 2025): TSV-M, TSV-C and STI.

TSV-M for one 2-D layer (Algorithm 1 of the TSV paper, eq. 4-6 and 9):

1. ``Delta_i = U_i Sigma_i V_i^T``; keep the top ``k = floor(R / T)`` components of each task
   (``R = min(m, n)``, ``T`` tasks; eq. 5).
2. Concatenate ``U = [U_1,k ... U_T,k]``, ``Sigma = blockdiag``, ``V = [V_1,k ... V_T,k]`` (eq. 6).
3. Orthogonalise ``U`` and ``V`` by Procrustes, ``U = P D Q^T -> P Q^T`` (eq. 9), equivalently the
   whitening ``U (U^T U)^{-1/2}`` (Proposition 4.1).
4. ``M_hat = U_perp Sigma V_perp^T``; the layer becomes ``theta_pre + alpha * M_hat``.

Non-matrix parameters use the mean of the task vectors (the paper's "standard Task Arithmetic ...
compute the average", Sec. B), scaled by alpha as FusionBench's TSVM does.

Speed, without changing the result: only the top ``k`` singular pairs of each task are needed,
and they are the top eigenpairs of the small Gram matrix (``Delta Delta^T`` or ``Delta^T Delta``,
whichever side is smaller) computed in float64, which is several times cheaper than a full SVD and
as accurate for the leading subspace. Procrustes needs only the ``Tk x Tk`` Gram ``U^T U``: with
``U^T U = Q D^2 Q^T``, ``P Q^T = U Q D^{-1} Q^T``. When that Gram is singular (duplicated tasks)
``P Q^T`` is not unique and we use the pseudo-inverse square root (see
:func:`procrustes_orthogonalize`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

# below this eigenvalue of U^T U (relative to the largest; columns of U have unit norm) a direction is
# treated as rank deficiency (duplicated tasks) rather than signal. It must sit just above the
# round-off of the Gram matrix (~eps of the dtype): 1e-8 dropped real directions of nearly
# dependent, but exactly representable, concatenations (e.g. 8 tasks x 96 vectors of a 768-wide
# layer, smallest eigenvalue 3e-8) and then disagreed with FusionBench's SVD-based polar factor.
_WHITENING_MIN_EIGENVALUE = 1e-12


def components_per_task(full_rank: int, num_tasks: int) -> int:
    """``k = floor(R / T)`` (TSV Algorithm 1 line 3: "retain first 1/T singular components")."""
    if num_tasks < 1:
        raise ValueError("TSV needs at least one task matrix")
    return full_rank // num_tasks


def _check_task_matrices(task_matrices: Sequence[Tensor]) -> None:
    if len(task_matrices) == 0:
        raise ValueError("TSV needs at least one task matrix")
    shape = task_matrices[0].shape
    if len(shape) != 2:
        raise ValueError(f"TSV-M merges 2-D task matrices, got shape {tuple(shape)}")
    for i, t in enumerate(task_matrices):
        if t.shape != shape:
            raise ValueError(f"task matrix {i} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"task matrix {i} contains NaN or Inf")


def top_singular_triplets(
    matrix: Tensor, k: int, *, compute_dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` singular triplets ``(U_k, s_k, V_k)`` of ``matrix`` (``m x n``) in ``compute_dtype``.

    Uses the eigen-decomposition of the Gram matrix on the smaller side. Triplets whose singular
    value is (numerically) zero, ``s_i <= 10 sqrt(eps) s_1`` (1.5e-7 ``s_1`` in float64), are **dropped**, so fewer than ``k`` columns
    come back when the matrix has rank below ``k`` (LoRA task matrices, tiny layers): such
    triplets carry no task information, are not unique (any orthonormal completion of the null
    space is an SVD), and kept in TSV-M's Procrustes step they would rotate the real task singular
    vectors by an arbitrary amount. (FusionBench keeps LAPACK's arbitrary completion.)
    """
    a = matrix.to(compute_dtype)
    m, n = a.shape
    if k <= 0:
        return a.new_zeros(m, 0), a.new_zeros(0), a.new_zeros(n, 0)
    wide = m <= n
    gram = a @ a.T if wide else a.T @ a
    evals, evecs = torch.linalg.eigh(gram)
    evals = evals.flip(0)[:k].clamp_min(0)
    evecs = evecs.flip(1)[:, :k]
    s = evals.sqrt()
    # s is descending, so the numerically-zero triplets are a suffix (their other side cannot be
    # recovered by division either). The Gram squares the spectrum: below ~sqrt(eps) s_1 its
    # eigen-pairs are round-off, hence the cut 10 sqrt(eps) s_1 (1.5e-7 float64, 3.5e-3 float32).
    nonzero = nonnull_count(s)
    s, evecs = s[:nonzero], evecs[:, :nonzero]
    if wide:
        u = evecs
        v = (a.T @ u) / s
    else:
        v = evecs
        u = (a @ v) / s
    return u, s, v


def nonnull_count(s: Tensor) -> int:
    """How many leading singular values of the descending ``s`` are not numerically zero:
    ``s_i > 10 sqrt(eps) s_1`` (eps of ``s``'s dtype; 1.5e-7 in float64, 3.5e-3 in float32).

    The one threshold for null triplets in TSV-M and STI. It is set for singular values obtained
    from a Gram matrix, which squares the spectrum (below ~sqrt(eps) s_1 its eigenpairs are
    round-off); for a direct SVD it is conservative.
    """
    if s.numel() == 0 or not bool(s[0] > 0):
        return 0
    cut = 10.0 * math.sqrt(torch.finfo(s.dtype).eps)
    return int((s > s[0] * cut).sum())


def procrustes_orthogonalize(x: Tensor) -> Tensor:
    """Nearest matrix with orthonormal columns, ``P Q^T`` for ``x = P D Q^T`` (TSV eq. 9).

    Computed as the whitening ``x (x^T x)^{-1/2}`` (TSV Proposition 4.1) from the small Gram
    matrix. When ``x`` is rank deficient (e.g. two identical tasks), ``P Q^T`` is not unique; we
    return the canonical partial isometry ``x (x^T x)^{+1/2}`` (pseudo-inverse square root), so
    that merging a task with itself gives the same update as merging it once.
    """
    if x.shape[1] == 0:
        return x
    evals, q = torch.linalg.eigh(x.T @ x)
    floor = max(_WHITENING_MIN_EIGENVALUE, 64 * torch.finfo(evals.dtype).eps)
    keep = evals > floor * max(float(evals.max()), 0.0)
    if not bool(keep.any()):
        return torch.zeros_like(x)
    q = q[:, keep]
    return (x @ q) @ (q / evals[keep].sqrt()).T


@dataclass
class TSVFactors:
    """Concatenated (and optionally orthogonalised) task singular vectors of one layer."""

    u: Tensor  # m x (T k)
    s: Tensor  # T k
    v: Tensor  # n x (T k)
    k: int


def concatenated_task_singular_vectors(
    task_matrices: Sequence[Tensor],
    k: int | None = None,
    *,
    compute_dtype: torch.dtype = torch.float64,
) -> TSVFactors:
    """Eq. 6: ``[U_1,k ... U_T,k]``, ``Sigma``, ``[V_1,k ... V_T,k]`` for one layer."""
    _check_task_matrices(task_matrices)
    m, n = task_matrices[0].shape
    if k is None:
        k = components_per_task(min(m, n), len(task_matrices))
    us, ss, vs = [], [], []
    for t in task_matrices:
        u, s, v = top_singular_triplets(t, k, compute_dtype=compute_dtype)
        us.append(u)
        ss.append(s)
        vs.append(v)
    return TSVFactors(u=torch.cat(us, 1), s=torch.cat(ss), v=torch.cat(vs, 1), k=k)


def tsv_merge(
    task_matrices: Sequence[Tensor],
    alpha: float = 1.0,
    *,
    k: int | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """TSV-M for one 2-D layer (TSV Algorithm 1): returns ``alpha * U_perp Sigma V_perp^T``.

    Add the result to ``theta_pre``. Output dtype and device follow the first task matrix.
    ``k`` defaults to ``floor(min(m, n) / T)``.
    """
    f = concatenated_task_singular_vectors(task_matrices, k, compute_dtype=compute_dtype)
    ref = task_matrices[0]
    return merge_tsv_factors(f, alpha, out_dtype=ref.dtype)


def merge_tsv_factors(
    factors: TSVFactors,
    alpha: float = 1.0,
    *,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Steps 3-4 of TSV-M from concatenated factors (eq. 6, 9): ``alpha * U_perp Sigma V_perp^T``.

    Lets a caller stream the tasks (keep only each task's top-``k`` triplets, never its dense
    task vector) and merge at the end; :func:`tsv_merge` is this after
    :func:`concatenated_task_singular_vectors`.
    """
    u = factors.u.to(compute_dtype)
    v = factors.v.to(compute_dtype)
    s = factors.s.to(compute_dtype)
    out_dtype = factors.u.dtype if out_dtype is None else out_dtype
    if u.shape[1] == 0:  # a layer too small for T tasks: nothing survives truncation
        return torch.zeros(u.shape[0], v.shape[0], dtype=out_dtype, device=u.device)
    u_perp = procrustes_orthogonalize(u)
    v_perp = procrustes_orthogonalize(v)
    merged = (u_perp * s) @ v_perp.T
    return (alpha * merged).to(out_dtype)


def mean_task_vector(task_vectors: Sequence[Tensor], alpha: float = 1.0) -> Tensor:
    """Non-matrix parameters in TSV-M: ``alpha * mean_i tau_i`` (computed in float32 or wider)."""
    if len(task_vectors) == 0:
        raise ValueError("need at least one task vector")
    ref = task_vectors[0]
    dtype = torch.promote_types(ref.dtype, torch.float32)
    acc = torch.zeros(ref.shape, dtype=dtype, device=ref.device)
    for t in task_vectors:
        if t.shape != ref.shape:
            raise ValueError(f"task vectors differ in shape: {tuple(t.shape)} vs {tuple(ref.shape)}")
        acc += t.to(dtype)
    return (alpha * acc / len(task_vectors)).to(ref.dtype)


def tsv_compress(task_matrix: Tensor, k: int, *, compute_dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """TSV-C (eq. 8): rank-``k`` factors ``(U_k Sigma_k, V_k^T)`` of one task matrix, in its dtype."""
    if task_matrix.ndim != 2:
        raise ValueError(f"TSV-C compresses 2-D task matrices, got shape {tuple(task_matrix.shape)}")
    if not 1 <= k <= min(task_matrix.shape):
        raise ValueError(f"k={k} is outside [1, {min(task_matrix.shape)}]")
    u, s, v = top_singular_triplets(task_matrix, k, compute_dtype=compute_dtype)
    # rank below k: zero columns / rows keep the stored shape (m x k, k x n); the product is exact
    pad = k - s.numel()
    us = torch.nn.functional.pad(u * s, (0, pad))
    vt = torch.nn.functional.pad(v.T, (0, 0, 0, pad))
    return us.to(task_matrix.dtype), vt.contiguous().to(task_matrix.dtype)


def sti(task_matrices: Sequence[Tensor], k: int | None = None) -> float:
    """Singular Task Interference, TSV eq. 7: ``|| (U^T U - I) Sigma (V^T V - I) ||_1``.

    ``U, Sigma, V`` concatenate the SVDs of the task matrices (all components by default, as eq. 7
    is written; pass ``k`` for the truncated TSVs). ``||.||_1`` is the entry-wise L1 norm.
    Computed in float64.

    Null singular triplets (``s_i <= 10 sqrt(eps) s_1``, the threshold of TSV-M, see
    :func:`nonnull_count`) are dropped: the singular vectors of a rank-deficient matrix's null space
    are an arbitrary completion, and kept they would count as interference between tasks that do
    not interfere (two rank-10 20 x 20 matrices in orthogonal subspaces would score ~77, not 0).
    """
    _check_task_matrices(task_matrices)
    us, ss, vs = [], [], []
    for t in task_matrices:
        u, s, vh = torch.linalg.svd(t.double(), full_matrices=False)
        kk = nonnull_count(s) if k is None else min(k, nonnull_count(s))
        us.append(u[:, :kk])
        ss.append(s[:kk])
        vs.append(vh[:kk].T)
    u, s, v = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
    return float((((u.T @ u - eye) * s) @ (v.T @ v - eye)).abs().sum())

"""PAVE task-vector purification (PAVE paper, Sec. 3.2, eq. 5-6; activated pruning error eq. 7-8).

Notation: a linear layer computes ``y = W x`` with ``W`` of shape ``out x in``; ``C = X X^T``
(``in x in``) is the covariance of the layer's inputs collected on task k with fine-tuned model k.

Eq. 5-6::

    W_ft^dagger = SVD_r(W_ft C) C^{-1}            (5)
    dW_PAVE     = SVD_r(W_ft C) C^{-1} - W_base    (6)

How it is computed here, and why. Let ``M = W_ft C = U S V^T``. Because ``S_r V_r^T = U_r^T M``,

    SVD_r(M) C^{-1} = U_r U_r^T M C^{-1} = U_r U_r^T W_ft,

so the inverse of ``C`` cancels *exactly*: ``C`` only chooses the subspace ``U_r`` (the top-r left
singular vectors of ``W_ft C``), and the purified weight is the projection of ``W_ft`` onto it.
We therefore never form ``C^{-1}`` and never solve with ``C`` (no loss of accuracy on
ill-conditioned covariances), and we write the purified task vector in residual form::

    dW_PAVE = dW - U_{>r} (U_{>r}^T W_ft)         with dW = W_ft - W_base,

which is exact at full rank (the tail is empty) and only sends the discarded tail through the
projection, so a task vector 1e-3 the size of the weight does not cancel catastrophically.
The default compute dtype is float64; float32 is an option (see README for its measured error).

``C`` may be singular (fewer tokens than features, dead features). As the paper says, we then
add a positive value to its diagonal and increase it (doubling, starting from a small fraction of
``mean(diag C)``) until a Cholesky factorisation succeeds. :class:`Damping` adds damping always,
as the authors' code does: ``relative`` (``C + delta mean(diag C) I``) or ``authors`` (an absolute
``eps`` on the token mean ``C / N``, doubled until ``||(C/N + eps I)^{-1} (C/N + eps I) - I||_F``
is below 1e-2, the test of the authors' NLG code; Appendix B.2: with few samples "due to the
regularization, the method degenerates to plain SVD"). The damping used is reported in
:class:`PreparedCovariance` and :class:`Purification`. With any damping, full rank still returns
``W_ft - W_base`` exactly (the inverse of the damped ``C`` cancels, see above).

``target="delta"`` is a variant (not in the paper) that purifies the task vector itself:
``SVD_r(dW C) C^{-1} = U_r U_r^T dW`` with ``U`` from ``dW C``; the base weight is untouched.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

Target = Literal["weight", "delta"]
TARGETS: tuple[str, ...] = ("weight", "delta")


def all_finite(t: Tensor) -> bool:
    """True when ``t`` has no NaN or Inf: one reduction (a NaN or Inf anywhere makes the sum non-finite),
    ~5x cheaper on CPU than ``isfinite(t).all()``, which decides only when the sum is not finite (a sum
    of finite values can overflow: bfloat16 and float32 near their largest value)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    acc = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    return bool(torch.isfinite(t.sum(dtype=acc))) or bool(torch.isfinite(t).all())


@dataclass(frozen=True)
class PreparedCovariance:
    """A covariance checked for use by PAVE: symmetric, finite, PSD and invertible after damping.

    ``matrix`` is ``C + damping * I`` in the compute dtype, on the input's device; ``factor`` its
    lower Cholesky factor when asked for (``keep_factor``: RegMean solves with it).
    """

    matrix: Tensor
    damping: float
    relative_damping: float  # damping / mean(diag C)
    factor: Tensor | None = None
    singular: bool = False  # damped beyond what was asked because C is singular


DAMPING_RULES: tuple[str, ...] = ("relative", "authors")
#: the authors' stopping test for their damping: ||C_d^{-1} C_d - I||_F below this (NLG code; 5e-2 for GLUE/ViT)
AUTHORS_INVERSE_TOLERANCE = 1e-2


@dataclass(frozen=True)
class Damping:
    """Diagonal damping added to ``C`` before eq. 5, always (0 with ``relative``: only if singular).

    ``relative``: ``amount * mean(diag C)``. ``authors``: ``amount`` is the authors' starting ``eps``
    on the token-mean covariance ``C / N`` (0.1 in their GLUE/ViT code, 0.01 or 0.5 for NLG), doubled
    until their inverse test passes (:func:`authors_damping`); in units of ``C`` that is ``eps N``.
    """

    amount: float = 0.0
    rule: str = "relative"


#: how far below zero round-off can put the smallest eigenvalue of a covariance ``X X^T`` stored in a
#: dtype, relative to mean(diag C) (float64 sums of millions of tokens stay far inside 1e-4)
SEMIDEFINITE_TOLERANCE = {torch.float64: 1e-4, torch.float32: 1e-2}


def check_semidefinite(c: Tensor, stored: torch.dtype, mean_diag: float, name: str = "covariance",
                       *, fast: bool = False) -> None:
    """Refuse an indefinite ``C``: ``X X^T`` has no negative eigenvalue, so the smallest one may be
    below zero only by round-off (:data:`SEMIDEFINITE_TOLERANCE` of the dtype ``C`` was stored in,
    0.1 for half precision) times mean(diag C). ``fast``: a Cholesky factorisation of ``C`` shifted
    by that allowance decides first (it succeeds exactly when no eigenvalue is below it); the
    eigenvalues are computed only when it fails."""
    allowance = SEMIDEFINITE_TOLERANCE.get(stored, 0.1) * mean_diag
    if fast:
        eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
        if int(torch.linalg.cholesky_ex(c + allowance * eye)[1]) == 0:
            return
    smallest = float(torch.linalg.eigvalsh(c.to(torch.float64))[0])
    if smallest < -allowance:
        raise ValueError(
            f"{name}: is not positive semi-definite (smallest eigenvalue {smallest / mean_diag:.3g} x mean(diag C)); "
            "a covariance X X^T has none below zero: the file is corrupt or not a covariance"
        )


def validated_covariance(
    cov: Tensor, *, compute_dtype: torch.dtype = torch.float64, symmetry_tol: float = 1e-6,
    name: str = "covariance", semidefinite: bool | str = False,
) -> tuple[Tensor, float]:
    """``C`` in ``compute_dtype``, symmetrised, and mean(diag C), after the checks every covariance
    passes where it enters (PAVE eq. 5 needs ``C = X X^T``): square, finite, not all zero, symmetric,
    a positive diagonal and, with ``semidefinite``, no eigenvalue below round-off
    (:func:`check_semidefinite`, ``"fast"``: by a shifted Cholesky factorisation first; otherwise
    that check runs only when a Cholesky factorisation fails).
    A ``ValueError`` names ``name``."""
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"{name}: expected a square 2-D matrix, got shape {tuple(cov.shape)}")
    c = cov.to(compute_dtype)
    if not all_finite(c):
        raise ValueError(f"{name}: contains NaN or Inf")
    scale = float(c.abs().max())
    if scale == 0.0:
        raise ValueError(f"{name}: is all zero (no tokens reached this layer?)")
    asym = float((c - c.T).abs().max()) / scale
    if asym > symmetry_tol:
        raise ValueError(f"{name}: is not symmetric (max |C - C^T| / max |C| = {asym:.3g})")
    c = 0.5 * (c + c.T)
    mean_diag = float(torch.diagonal(c).mean())
    if mean_diag <= 0.0 or float(torch.diagonal(c).min()) < -1e-8 * scale:
        raise ValueError(f"{name}: has negative diagonal entries, it is not a covariance X X^T")
    if semidefinite:
        check_semidefinite(c, cov.dtype, mean_diag, name, fast=semidefinite == "fast")
    return c, mean_diag


def prepare_covariance(
    cov: Tensor,
    *,
    compute_dtype: torch.dtype = torch.float64,
    initial_relative_damping: float = 1e-10,
    max_relative_damping: float = 1.0,
    symmetry_tol: float = 1e-6,
    name: str = "covariance",
    keep_factor: bool = False,
    damping: Damping = Damping(),
    n_tokens: int | None = None,
) -> PreparedCovariance:
    """Validate ``C``, add ``damping`` (:class:`Damping`; ``n_tokens``: the ``N`` of the
    ``authors`` rule) and damp further until a Cholesky factorisation succeeds (Sec. 3.2).

    Further damping starts at ``initial_relative_damping * mean(diag C)`` (or doubles the damping
    asked for); past ``max_relative_damping * mean(diag C)`` a ``ValueError`` is raised instead (a
    giant shift would silently change the method). Cache the result when several weights share one
    covariance.
    """
    c, mean_diag = validated_covariance(cov, compute_dtype=compute_dtype, symmetry_tol=symmetry_tol, name=name)
    if damping.rule not in DAMPING_RULES:
        raise ValueError(f"{name}: unknown damping rule {damping.rule!r}, expected one of {DAMPING_RULES}")
    asked = authors_damping(c, damping.amount, n_tokens, name) if damping.rule == "authors" else (
        damping.amount * mean_diag)
    n = c.shape[0]
    eye = torch.eye(n, dtype=c.dtype, device=c.device)
    # Cholesky "succeeds" when the factor has no tiny pivot relative to the matrix scale: a pivot
    # below this floor means C is numerically singular in the compute dtype.
    pivot_floor = n * torch.finfo(c.dtype).eps * float(torch.diagonal(c).max())
    ceiling = max(max_relative_damping * mean_diag, asked)
    amount = asked
    while True:
        matrix = c if amount == 0.0 else c + amount * eye
        factor, info = torch.linalg.cholesky_ex(matrix)
        if int(info) == 0 and float(torch.diagonal(factor).min()) ** 2 > pivot_floor:
            break
        if amount == 0.0:
            check_semidefinite(c, cov.dtype, mean_diag, name)  # only a singular PSD matrix is damped
        amount = 2.0 * amount if amount > 0.0 else initial_relative_damping * mean_diag
        if amount > ceiling:
            raise ValueError(
                f"{name}: not positive definite even with damping {amount / 2:.3g} "
                f"({max_relative_damping:g} x mean(diag C)); it is not a valid covariance"
            )
    if amount > asked:
        logger.debug("%s: singular, damped with %.3g (%.3g x mean diag)", name, amount, amount / mean_diag)
    return PreparedCovariance(
        matrix=matrix, damping=amount, relative_damping=amount / mean_diag, factor=factor if keep_factor else None,
        singular=amount > asked,
    )


def authors_damping(c: Tensor, eps: float, n_tokens: int | None, name: str = "covariance") -> float:
    """The damping of the authors' code, in units of ``C``: ``eps N`` for the first ``eps`` (from the
    one given, doubling) with ``||(C/N + eps I)^{-1} (C/N + eps I) - I||_F`` below
    :data:`AUTHORS_INVERSE_TOLERANCE`, tested in float32 as their covariances are."""
    if not n_tokens or n_tokens <= 0:
        raise ValueError(f"{name}: damping rule 'authors' needs the token count N of the covariance (C / N); "
                         "the file records none (collect it again with pave collect, or use damping rule 'relative')")
    if not eps > 0.0:
        raise ValueError(f"{name}: damping rule 'authors' needs damping > 0 (their code starts at 0.1), got {eps}")
    mean = (c / n_tokens).to(torch.float32)
    eye = torch.eye(c.shape[0], dtype=torch.float32, device=c.device)
    for _ in range(200):
        damped = mean + eps * eye
        inverse, info = torch.linalg.inv_ex(damped)
        if int(info) == 0 and float(torch.linalg.matrix_norm(inverse @ damped - eye)) < AUTHORS_INVERSE_TOLERANCE:
            return eps * n_tokens
        eps *= 2.0
    raise ValueError(f"{name}: the authors' inverse test never passed (damping {eps:.3g} on C / N)")


@dataclass
class CoSVD:
    """Context-oriented SVD of one weight: ``M = A C = U S V^T`` with ``A = W_ft`` or ``dW``.

    Holds only what purification needs: the left singular vectors ``u`` (``out x R``), the
    singular values ``s`` (``R``, descending; these are the sigma of Algorithm 1 line 3), the
    task vector and the fine-tuned weight in the compute dtype.
    """

    u: Tensor
    s: Tensor
    delta: Tensor
    w_ft: Tensor
    target: str
    damping: float
    out_dtype: torch.dtype
    relative_damping: float = 0.0  # damping / mean(diag C)

    @property
    def full_rank(self) -> int:
        return int(self.s.shape[0])


def co_svd(
    w_ft: Tensor,
    w_base: Tensor,
    cov: Tensor | PreparedCovariance,
    *,
    target: Target = "weight",
    compute_dtype: torch.dtype = torch.float64,
    name: str = "weight",
) -> CoSVD:
    """The one SVD per layer per model of PAVE (Algorithm 1 line 3; eq. 5).

    ``w_ft`` and ``w_base`` are ``out x in``; ``cov`` is ``in x in`` (or prepared).
    """
    m, ft, delta, prepared = _co_matrix(w_ft, w_base, cov, target, compute_dtype, name)
    u, s = _left_singular_pairs(m)
    return CoSVD(
        u=u,
        s=s,
        delta=delta,
        w_ft=ft,
        target=target,
        damping=prepared.damping,
        out_dtype=w_ft.dtype,
        relative_damping=prepared.relative_damping,
    )


def co_singular_values(
    w_ft: Tensor,
    w_base: Tensor,
    cov: Tensor | PreparedCovariance,
    *,
    target: Target = "weight",
    compute_dtype: torch.dtype = torch.float64,
    name: str = "weight",
) -> Tensor:
    """The sigma of Algorithm 1 line 3 alone (singular values of ``W_ft C`` or ``dW C``, descending)."""
    m, *_ = _co_matrix(w_ft, w_base, cov, target, compute_dtype, name)
    return torch.linalg.svdvals(m)


def _co_matrix(
    w_ft: Tensor, w_base: Tensor, cov: Tensor | PreparedCovariance, target: str, compute_dtype: torch.dtype, name: str
) -> tuple[Tensor, Tensor, Tensor, PreparedCovariance]:
    """``A C`` of eq. 5 (``A = W_ft`` or ``dW``) after the checks, with ``W_ft``, ``dW`` and the prepared ``C``."""
    if target not in TARGETS:
        raise ValueError(f"{name}: unknown purification target {target!r}, expected one of {TARGETS}")
    if w_ft.ndim != 2:
        raise ValueError(f"{name}: PAVE purifies 2-D weights, got shape {tuple(w_ft.shape)}")
    if w_ft.shape != w_base.shape:
        raise ValueError(
            f"{name}: fine-tuned weight {tuple(w_ft.shape)} and base weight "
            f"{tuple(w_base.shape)} differ in shape"
        )
    prepared = (
        cov
        if isinstance(cov, PreparedCovariance)
        else prepare_covariance(cov, compute_dtype=compute_dtype, name=f"covariance of {name}")
    )
    c = prepared.matrix.to(device=w_ft.device, dtype=compute_dtype)
    if c.shape[0] != w_ft.shape[1]:
        raise ValueError(
            f"{name}: covariance is {tuple(c.shape)} but the weight has {w_ft.shape[1]} inputs "
            f"(expected {w_ft.shape[1]} x {w_ft.shape[1]})"
        )
    ft = w_ft.to(compute_dtype)
    base = w_base.to(device=w_ft.device, dtype=compute_dtype)
    for tensor, what in ((ft, "fine-tuned weight"), (base, "base weight")):
        if not all_finite(tensor):
            raise ValueError(f"{name}: {what} contains NaN or Inf")
    delta = ft - base
    a = ft if target == "weight" else delta
    return a @ c, ft, delta, prepared


def _left_singular_pairs(m: Tensor) -> tuple[Tensor, Tensor]:
    """Left singular vectors and singular values of ``m`` (the right ones are never needed).

    For a wide ``m`` (out < in, e.g. MLP up-projections) a QR of ``m^T`` first reduces the SVD to
    a square ``out x out`` one (``m = R^T Q^T``), about 2.5x faster than a direct SVD there.
    """
    if m.shape[0] < m.shape[1]:
        _, r = torch.linalg.qr(m.T, mode="reduced")
        u, s, _ = torch.linalg.svd(r.T)
        return u, s
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    return u, s


@dataclass
class Purification:
    """Result of purifying one weight of one model.

    ``task_vector`` is dW_PAVE (eq. 6) in the fine-tuned weight's dtype. The low-rank form is
    ``dW_PAVE = dW - tail_left @ tail_right`` (rank ``R - rank``), and the purified weight of
    eq. 5 is ``head_left @ head_right`` (see :func:`purified_weight_factors`).
    """

    task_vector: Tensor
    rank: int
    full_rank: int
    singular_values: Tensor
    damping: float
    relative_change: float  # ||dW_PAVE - dW||_F / ||dW||_F (inf when dW = 0 and the change is not)
    pruning_error: float  # normalised activated pruning error, eq. 8
    tail_left: Tensor
    tail_right: Tensor
    relative_damping: float = 0.0  # damping / mean(diag C)


def _check_rank(rank: int | None, full_rank: int, name: str) -> int:
    if rank is None:
        return full_rank
    if isinstance(rank, bool) or int(rank) != rank:
        raise ValueError(f"{name}: rank must be an integer, got {rank!r}")
    rank = int(rank)
    if not 1 <= rank <= full_rank:
        raise ValueError(f"{name}: rank {rank} is outside [1, {full_rank}] (full rank of the layer)")
    return rank


def activated_pruning_error(singular_values: Tensor, rank: int) -> float:
    """Normalised activated pruning error, eq. 7-8: ``sum_{j>r} (sigma_j / sigma_max)^2``.

    Equals ``||(dW_PAVE - dW) C||_F^2 / sigma_max(W C)^2`` for target ``weight``.
    """
    s = singular_values.double()
    smax = float(s.max()) if s.numel() else 0.0
    if smax == 0.0:
        return 0.0
    return float(((s[rank:] / smax) ** 2).sum())


def purify_from_cosvd(decomposition: CoSVD, rank: int | None = None, *, name: str = "weight") -> Purification:
    """Eq. 6 in residual form from an existing :class:`CoSVD` (no second decomposition)."""
    d = decomposition
    r = _check_rank(rank, d.full_rank, name)
    a = d.w_ft if d.target == "weight" else d.delta
    tail_u = d.u[:, r:]
    tail_right = tail_u.T @ a  # U_{>r}^T A : (R - r) x in
    correction = tail_u @ tail_right
    pave = d.delta - correction
    dnorm = float(torch.linalg.matrix_norm(d.delta))
    cnorm = float(torch.linalg.matrix_norm(correction))
    rel = cnorm / dnorm if dnorm > 0 else (0.0 if cnorm == 0 else math.inf)
    return Purification(
        task_vector=pave.to(d.out_dtype),
        rank=r,
        full_rank=d.full_rank,
        singular_values=d.s,
        damping=d.damping,
        relative_change=rel,
        pruning_error=activated_pruning_error(d.s, r),
        tail_left=tail_u,
        tail_right=tail_right,
        relative_damping=d.relative_damping,
    )


def purify(
    w_ft: Tensor,
    w_base: Tensor,
    cov: Tensor | PreparedCovariance,
    rank: int | None = None,
    *,
    target: Target = "weight",
    compute_dtype: torch.dtype = torch.float64,
    name: str = "weight",
) -> Purification:
    """Purify one weight (eq. 5-6) and return the task vector with its diagnostics."""
    dec = co_svd(w_ft, w_base, cov, target=target, compute_dtype=compute_dtype, name=name)
    return purify_from_cosvd(dec, rank, name=name)


def purified_task_vector(
    w_ft: Tensor,
    w_base: Tensor,
    cov: Tensor | PreparedCovariance,
    rank: int | None = None,
    *,
    target: Target = "weight",
    compute_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """dW_PAVE = SVD_r(W_ft C) C^{-1} - W_base (eq. 6), dense, in ``w_ft``'s dtype.

    ``rank=None`` keeps full rank (returns ``W_ft - W_base`` up to round-off).
    """
    return purify(w_ft, w_base, cov, rank, target=target, compute_dtype=compute_dtype).task_vector


def purified_weight_factors(decomposition: CoSVD, rank: int | None = None) -> tuple[Tensor, Tensor]:
    """Low-rank factors of eq. 5: ``SVD_r(M) C^{-1} = U_r (U_r^T A)`` with ``A = W_ft`` or ``dW``.

    Returns ``(left, right)`` of shapes ``out x r`` and ``r x in`` (compute dtype). For target
    ``weight`` their product is the purified weight W_ft^dagger; for ``delta`` it is dW_PAVE.
    """
    r = _check_rank(rank, decomposition.full_rank, "weight")
    a = decomposition.w_ft if decomposition.target == "weight" else decomposition.delta
    head = decomposition.u[:, :r]
    return head, head.T @ a

"""LoRA-DV spectral rethinking (arXiv "Spectral Rethinking for Reducing Task Interference via
Difference Vector in Model Merging", eq. 6-14), pure torch.

For every selected 2-D layer ``l`` of a merged model:

* difference vector ``delta_l = theta_merged_l - theta_pre_l`` (eq. 6 / 9);
* SVD ``delta_l = U_l diag(Sigma_l) V_l^T`` (eq. 7 / 10);
* a learnable anisotropic scale ``Lambda_l`` (initialised to 1) in
  ``W_l(Lambda) = theta_pre_l + U_l diag(Lambda_l * Sigma_l) V_l^T`` (eq. 8 / 11), with
  ``theta_pre``, ``U``, ``V`` and ``Sigma`` frozen;
* all ``Lambda_l`` jointly minimise a calibration loss of the whole model (eq. 12-13): cross-entropy
  with labels, or the Shannon entropy of the predictions (eq. 14) without labels;
* ``T`` iterations, each re-decomposing the new difference vector (Sec. 4.2).

The model is never copied per step: the rethought weights are passed to
:func:`torch.func.functional_call`, the model's own parameters are only overwritten (in place,
without autograd) at the end of each iteration.

Decompositions:

* dense path (:func:`decompose_dense`): ``torch.linalg.svd`` of ``delta`` in ``compute_dtype``,
  optionally keeping only the top-``k`` components (``keep_tail`` folds the discarded tail into
  the frozen anchor instead of dropping it);
* low-rank fast path (:func:`decompose_low_rank`): when ``delta = sum_i lambda_i B_i A_i`` (a merge
  of LoRA experts), thin QR of the stacked ``[lambda_1 B_1 ... lambda_K B_K]`` and
  ``[A_1; ...; A_K]^T`` then an SVD of the small ``R x R`` core (``R = sum_i r_i``); no dense SVD.

Re-decomposition at iteration ``t >= 1`` (``redecompose="factored"``, default): the new difference
vector is ``U diag(Lambda * Sigma) V^T`` with the *same* orthonormal ``U`` and ``V``, so its SVD is
exact in closed form: singular values ``|Lambda_j sigma_j|`` sorted in decreasing order, the sign
of ``Lambda_j sigma_j`` moved into ``U``. ``redecompose="dense"`` recomputes the SVD of
``theta^(t) - theta_pre`` from the stored weights instead (what the paper literally writes; the
same result up to round-off, at the cost of a dense SVD per layer and iteration).

Ablations of Table 4: ``mode="scalar"`` learns one isotropic scale per layer; ``mode="random"``
draws ``Lambda`` uniformly in ``random_range`` (no training).

A layer whose ``Lambda`` never moved from exactly 1 keeps its input weight bit for bit
(``epochs=0`` reproduces the input merge exactly), unless ``top_k`` without ``keep_tail`` drops its
tail: then it is ``theta_pre`` plus its top-k components.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

MODES = ("anisotropic", "scalar", "random")
REDECOMPOSE = ("factored", "dense")
LOSSES = ("ce", "entropy")


# ----------------------------------------------------------------------------- decompositions
@dataclass
class Spectrum:
    """Thin SVD ``delta = u @ diag(s) @ v.T`` of one difference matrix (``u``: out x r,
    ``s``: r, ``v``: in x r), singular values in decreasing order."""

    u: Tensor
    s: Tensor
    v: Tensor

    @property
    def rank(self) -> int:
        return int(self.s.numel())

    def matrix(self, lam: Tensor | None = None) -> Tensor:
        """``U diag(Lambda * Sigma) V^T`` (eq. 8); ``lam`` broadcasts (one scalar: isotropic)."""
        scale = self.s if lam is None else lam.to(self.s.dtype) * self.s
        return (self.u * scale) @ self.v.T

    def rescaled(self, lam: Tensor) -> tuple["Spectrum", Tensor]:
        """Exact SVD of ``U diag(lam * s) V^T`` (closed form: sort ``|lam s|``, signs into U).

        Returns the new spectrum and the permutation ``order`` (new component ``j`` is old
        component ``order[j]``).
        """
        scaled = lam.detach().to(self.s.dtype).expand_as(self.s) * self.s
        sign = torch.where(scaled < 0, -1.0, 1.0).to(self.s.dtype)
        mag = scaled.abs()
        order = torch.argsort(mag, descending=True, stable=True)
        return Spectrum(u=(self.u * sign)[:, order], s=mag[order], v=self.v[:, order]), order


def _check_matrix(delta: Tensor, name: str) -> None:
    if delta.ndim != 2:
        raise ValueError(f"{name}: spectral rethinking needs a 2-D difference matrix, got shape {tuple(delta.shape)}")
    if not bool(torch.isfinite(delta).all()):
        raise ValueError(f"{name}: the difference vector contains NaN or Inf")


def _truncate(spec: Spectrum, top_k: int | None) -> Spectrum:
    if top_k is None or top_k >= spec.rank:
        return spec
    if top_k < 1:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    return Spectrum(spec.u[:, :top_k], spec.s[:top_k], spec.v[:, :top_k])


def decompose_dense(
    delta: Tensor,
    *,
    top_k: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
    name: str = "layer",
) -> Spectrum:
    """Dense path: thin SVD of ``delta`` (eq. 7 / 10) in ``compute_dtype`` on ``delta``'s device,
    optionally only the top-``k`` components."""
    _check_matrix(delta, name)
    u, s, vh = torch.linalg.svd(delta.to(compute_dtype), full_matrices=False)
    return _truncate(Spectrum(u=u, s=s, v=vh.T), top_k)


@dataclass
class LowRankDelta:
    """``delta = sum_i weights[i] * B_i @ A_i`` (``B_i``: out x r_i, ``A_i``: r_i x in), e.g. a
    weighted sum of LoRA experts (LoRA scaling ``alpha / r`` folded into ``weights`` or ``B_i``)."""

    b: Sequence[Tensor]
    a: Sequence[Tensor]
    weights: Sequence[float] | None = None

    def __post_init__(self) -> None:
        if len(self.b) != len(self.a) or len(self.b) == 0:
            raise ValueError(f"LowRankDelta needs as many B as A factors (>= 1), got {len(self.b)} and {len(self.a)}")
        if self.weights is not None and len(self.weights) != len(self.b):
            raise ValueError(f"LowRankDelta: {len(self.weights)} weights for {len(self.b)} factor pairs")

    def stacked(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(B_cat, A_cat)`` with ``delta = B_cat @ A_cat`` (weights folded into B)."""
        weights = self.weights if self.weights is not None else [1.0] * len(self.b)
        out, inp = self.b[0].shape[0], self.a[0].shape[1]
        for i, (b, a) in enumerate(zip(self.b, self.a)):
            if b.ndim != 2 or a.ndim != 2 or b.shape[0] != out or a.shape[1] != inp or b.shape[1] != a.shape[0]:
                raise ValueError(
                    f"LowRankDelta factor pair {i}: B {tuple(b.shape)} and A {tuple(a.shape)} do not form an "
                    f"{out}x{inp} product"
                )
        b_cat = torch.cat([float(w) * b.to(dtype) for w, b in zip(weights, self.b)], dim=1)
        a_cat = torch.cat([a.to(dtype) for a in self.a], dim=0)
        return b_cat, a_cat

    def dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        b_cat, a_cat = self.stacked(dtype)
        return b_cat @ a_cat


def decompose_low_rank(
    delta: LowRankDelta | tuple[Tensor, Tensor],
    *,
    top_k: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
    name: str = "layer",
) -> Spectrum:
    """Low-rank fast path: SVD of ``B_cat @ A_cat`` without forming it.

    ``B_cat = Q_b R_b`` and ``A_cat^T = Q_a R_a`` (thin QR), ``R_b R_a^T = U_m diag(s) V_m^T``
    (an ``R x R`` SVD), hence ``delta = (Q_b U_m) diag(s) (Q_a V_m)^T``. Cost
    ``O((out + in) R^2 + R^3)`` instead of ``O(out * in * min(out, in))``.
    """
    if isinstance(delta, LowRankDelta):
        b_cat, a_cat = delta.stacked(compute_dtype)
    else:
        b_cat, a_cat = (t.to(compute_dtype) for t in delta)
    if not (bool(torch.isfinite(b_cat).all()) and bool(torch.isfinite(a_cat).all())):
        raise ValueError(f"{name}: the low-rank factors contain NaN or Inf")
    q_b, r_b = torch.linalg.qr(b_cat, mode="reduced")
    q_a, r_a = torch.linalg.qr(a_cat.T, mode="reduced")
    u_m, s, vh_m = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return _truncate(Spectrum(u=q_b @ u_m, s=s, v=q_a @ vh_m.T), top_k)


# ----------------------------------------------------------------------------- losses
class NonFiniteLossError(FloatingPointError, ValueError):
    """The calibration loss became NaN or Inf (a learning rate too large, or the model's own outputs)."""


def entropy_loss(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Shannon entropy of the predictions, eq. 14: ``-sum_c p_c log p_c`` averaged over the rows
    of ``logits`` (``[..., C]``) where ``mask`` (``[...]``, bool) is true."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ent = -(logp.exp() * logp).sum(dim=-1)
    if mask is None:
        return ent.mean()
    mask = mask.to(torch.bool)
    if not bool(mask.any()):
        raise ValueError("entropy_loss: the mask selects no position")
    return ent[mask].mean()


def classification_loss(logits: Tensor, labels: Tensor | None = None, loss: str = "ce") -> Tensor:
    """Sequence / image classification: ``ce`` (needs ``labels``) or ``entropy`` (eq. 14)."""
    if loss == "ce":
        if labels is None:
            raise ValueError("the 'ce' loss needs labels; use loss='entropy' for unlabelled calibration data")
        return nn.functional.cross_entropy(logits.float(), labels.long())
    if loss == "entropy":
        return entropy_loss(logits)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def token_loss(
    logits: Tensor,
    labels: Tensor | None = None,
    loss: str = "ce",
    *,
    shift: bool = False,
    mask: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Token-level loss of a causal LM (``shift=True``: position ``i`` predicts token ``i+1``) or
    of a seq2seq decoder (``shift=False``), on the positions whose label is not ``ignore_index``
    (the target tokens).

    ``ce``: mean cross-entropy over target tokens. ``entropy``: mean Shannon entropy (eq. 14) of
    the predicted token distributions over the same positions (labels only choose the positions),
    or over ``mask`` when there are no labels (for a causal LM, e.g. the attention mask).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if labels is None and loss == "ce":
        raise ValueError("the 'ce' loss needs target tokens (labels); use loss='entropy' without them")
    if shift:
        logits = logits[..., :-1, :]
        if labels is not None:
            labels = labels[..., 1:]
        if mask is not None:
            mask = mask[..., :-1]  # position i predicts i+1: position i must be a real token
    if labels is not None:
        valid = labels != ignore_index
        if not bool(valid.any()):
            raise ValueError("token_loss: no target token in the batch (every label is ignore_index)")
        if loss == "ce":
            return nn.functional.cross_entropy(logits[valid].float(), labels[valid].long())
        return entropy_loss(logits, valid)
    return entropy_loss(logits, mask)


# ----------------------------------------------------------------------------- rethinking
def _positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and int(value) == value and value >= 1


@dataclass
class RethinkConfig:
    """LoRA-DV hyper-parameters, declared once: the ``pave rethink`` flags, the FusionBench
    ``pave/rethink`` config and the Python API all map onto this record, validated when built.

    Paper defaults: T=3 iterations, 10 epochs, Adam lr 5e-3, 32 calibration samples per task
    (LLMs: lr 1e-4, 5 epochs). ``loss``: ``ce`` (labels) or ``entropy`` (eq. 14); ``samples``:
    calibration samples per task (``None``: all); ``batch_size``: calibration batch size;
    ``compute_dtype``: ``float32``/``float64`` (a name or a torch dtype).
    """

    iterations: int = 3
    epochs: int = 10
    lr: float = 5e-3
    mode: str = "anisotropic"
    top_k: int | None = None
    keep_tail: bool = False
    redecompose: str = "factored"
    compute_dtype: torch.dtype = torch.float32
    seed: int = 0
    shuffle: bool = True
    random_range: tuple[float, float] = (0.0, 2.0)
    min_delta_norm: float = 0.0
    progress: bool = True
    loss: str = "ce"
    samples: int | None = 32
    batch_size: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.compute_dtype, str):
            name = self.compute_dtype.lower().replace("torch.", "")
            self.compute_dtype = getattr(torch, name) if name in ("float32", "float64") else self.compute_dtype
        self.validate()

    def validate(self) -> None:
        if not _positive_int(self.iterations):
            raise ValueError(f"iterations must be a positive integer, got {self.iterations!r}")
        if isinstance(self.epochs, bool) or int(self.epochs) != self.epochs or self.epochs < 0:
            raise ValueError(f"epochs must be a non-negative integer, got {self.epochs!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"lr must be a finite non-negative number, got {self.lr!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.redecompose not in REDECOMPOSE:
            raise ValueError(f"redecompose must be one of {REDECOMPOSE}, got {self.redecompose!r}")
        if self.top_k is not None and not _positive_int(self.top_k):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be float32 or float64, got {self.compute_dtype}")
        lo, hi = self.random_range
        if not lo <= hi:
            raise ValueError(f"random_range must be (low, high) with low <= high, got {self.random_range}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.samples is not None and not _positive_int(self.samples):
            raise ValueError(f"samples must be a positive integer (or None for all), got {self.samples!r}")
        if not _positive_int(self.batch_size):
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")


@dataclass
class LayerState:
    """Frozen pieces of one rethought layer: ``W(Lambda) = anchor + U diag(Lambda Sigma) V^T``."""

    name: str
    anchor: Tensor  # theta_pre (plus the dropped tail when keep_tail), compute dtype
    spectrum: Spectrum
    gain: Tensor  # cumulative signed gain per component of the *first* decomposition
    origin: Tensor  # index, in the first decomposition, of each current component
    changed: bool = False
    drops_tail: bool = False  # top_k without keep_tail: the model still holds the discarded components

    def weight(self, lam: Tensor | None = None) -> Tensor:
        return self.anchor + self.spectrum.matrix(lam)


@dataclass
class RethinkResult:
    """What :func:`rethink` learned.

    ``lambdas[t][layer]``: the Lambda of iteration ``t`` (in that iteration's component order);
    ``sigmas[t][layer]``: that iteration's singular values (eq. 10); ``gains[layer]``: the overall
    signed gain per component of the first decomposition (product of the Lambdas, exact with
    ``redecompose="factored"``); ``losses[t]``: mean calibration loss per epoch; ``paths``:
    ``"low_rank"`` or ``"dense"`` per layer.
    """

    layers: list[str]
    lambdas: list[dict[str, Tensor]] = field(default_factory=list)
    sigmas: list[dict[str, Tensor]] = field(default_factory=list)
    gains: dict[str, Tensor] = field(default_factory=dict)
    losses: list[list[float]] = field(default_factory=list)
    paths: dict[str, str] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)
    config: RethinkConfig | None = None

    def lambda_tensors(self) -> dict[str, Tensor]:
        """Flat ``{key: tensor}`` for a safetensors file: ``<layer>.lambda.<t>``, ``<layer>.sigma.<t>``
        and ``<layer>.gain``."""
        out: dict[str, Tensor] = {}
        for t, (lams, sigs) in enumerate(zip(self.lambdas, self.sigmas)):
            for name in self.layers:
                out[f"{name}.lambda.{t}"] = lams[name].detach().float().cpu().contiguous()
                out[f"{name}.sigma.{t}"] = sigs[name].detach().float().cpu().contiguous()
        for name, g in self.gains.items():
            out[f"{name}.gain"] = g.detach().float().cpu().contiguous()
        return out


class Forward:
    """``forward(*args, params=None, **kwargs)``: the model called with the current rethought
    weights via :func:`torch.func.functional_call` (``params`` adds or replaces tensors, e.g. a
    task's classification head)."""

    def __init__(self, model: nn.Module, weights: Mapping[str, Tensor]):
        self.model = model
        self.weights = weights

    def __call__(self, *args: Any, params: Mapping[str, Tensor] | None = None, **kwargs: Any) -> Any:
        tensors = dict(self.weights)
        if params:
            tensors.update(params)
        return torch.func.functional_call(self.model, tensors, args, kwargs, strict=False, tie_weights=True)


LossFn = Callable[[Forward, Any], Tensor]
#: ``progress_bar(iterable, description) -> iterable`` (e.g. a ``tqdm`` partial); core imports none
ProgressBar = Callable[[Iterable, str], Iterable]


def default_layers(model: nn.Module, base: Mapping[str, Tensor], *, exclude: Iterable[str] = ()) -> list[str]:
    """2-D floating parameters of ``model`` that have a base tensor of the same shape."""
    skip = set(exclude)
    out = []
    for name, p in model.named_parameters():
        if name in skip or p.ndim != 2 or not p.is_floating_point():
            continue
        if name in base and tuple(base[name].shape) == tuple(p.shape):
            out.append(name)
    return out


def _param_dict(model: nn.Module) -> dict[str, Tensor]:
    params = dict(model.named_parameters(remove_duplicate=False))
    return params


def rethink(
    model: nn.Module,
    base: Mapping[str, Tensor],
    batches: Sequence[Any],
    loss_fn: LossFn,
    *,
    layers: Sequence[str] | None = None,
    low_rank: Mapping[str, LowRankDelta] | None = None,
    config: RethinkConfig | None = None,
    progress_bar: ProgressBar | None = None,
    **overrides: Any,
) -> RethinkResult:
    """Spectral rethinking of the merged ``model`` in place (eq. 8-13), ``T`` iterations.

    Args:
        model: the merged model (its parameters hold ``theta_merged``); frozen, put in eval mode
            during rethinking (restored after); its rethought parameters are overwritten at the end
            of each iteration.
        base: ``{parameter name: theta_pre}`` for (at least) the rethought layers.
        batches: the calibration set, a sequence of batches (shuffled per epoch with the seed).
        loss_fn: ``loss_fn(forward, batch) -> scalar``; ``forward(*args, params=None, **kw)`` runs
            the model with the current rethought weights (see :class:`Forward`).
        layers: parameter names to rethink (default: every 2-D parameter with a base of the same
            shape, see :func:`default_layers`); layers whose difference vector has Frobenius norm
            ``<= min_delta_norm`` are skipped.
        low_rank: ``{parameter name: LowRankDelta}``: layers whose difference vector is known in
            factored form (LoRA experts); their first decomposition uses the fast path and the
            merged weight is taken as it is in ``model``.
        config / overrides: :class:`RethinkConfig` fields.
    """
    cfg = config if config is not None else RethinkConfig()
    if overrides:
        cfg = RethinkConfig(**{**cfg.__dict__, **overrides})
    cfg.validate()
    low_rank = dict(low_rank or {})
    params = _param_dict(model)
    layers = _checked_layers(params, base, default_layers(model, base) if layers is None else layers, low_rank)
    with torch.no_grad():
        states, paths = _first_decomposition(params, base, layers, low_rank, cfg)
    result = RethinkResult(layers=list(states), paths=paths, config=cfg)
    if not states:
        log.warning("rethink: no layer to rethink (no 2-D parameter differs from the base)")
        return result
    log.info(
        "rethink: %d layers (%d low-rank fast path), %d Lambda parameters, mode=%s, T=%d, epochs=%d, lr=%g",
        len(states), sum(v == "low_rank" for v in paths.values()),
        sum(1 if cfg.mode == "scalar" else s.spectrum.rank for s in states.values()),
        cfg.mode, cfg.iterations, cfg.epochs, cfg.lr,
    )
    was_training = model.training
    requires = {n: p.requires_grad for n, p in params.items()}
    model.eval()
    for p in params.values():
        p.requires_grad_(False)
    try:
        _iterate(model, params, base, states, batches, loss_fn, cfg, progress_bar, result)
    finally:
        for n, p in params.items():
            p.requires_grad_(requires[n])
        model.train(was_training)
    for name, st in states.items():
        result.gains[name] = st.gain.detach().clone()
    result.changed = [n for n, st in states.items() if st.changed]
    return result


def _checked_layers(
    params: Mapping[str, Tensor], base: Mapping[str, Tensor], layers: Sequence[str], low_rank: Mapping[str, LowRankDelta]
) -> list[str]:
    """``layers`` plus the low-rank ones, each present in the model and the base with one shape."""
    for name in list(layers) + list(low_rank):
        if name not in params:
            raise KeyError(f"rethink: the model has no parameter {name!r}")
        if name not in base:
            raise KeyError(f"rethink: no base (theta_pre) tensor for layer {name!r}")
        if tuple(base[name].shape) != tuple(params[name].shape):
            raise ValueError(
                f"rethink: layer {name!r}: base shape {tuple(base[name].shape)} != merged shape {tuple(params[name].shape)}"
            )
    return list(dict.fromkeys(list(layers) + [n for n in low_rank if n not in layers]))


def _first_decomposition(
    params: Mapping[str, Tensor],
    base: Mapping[str, Tensor],
    layers: Sequence[str],
    low_rank: Mapping[str, LowRankDelta],
    cfg: RethinkConfig,
) -> tuple[dict[str, LayerState], dict[str, str]]:
    """Eq. 7: the frozen pieces of every layer (low-rank fast path where the factors are known)."""
    dt = cfg.compute_dtype
    states: dict[str, LayerState] = {}
    paths: dict[str, str] = {}
    for name in layers:
        p = params[name]
        theta_pre = base[name].to(device=p.device, dtype=dt)
        if name in low_rank:
            whole = decompose_low_rank(low_rank[name], compute_dtype=dt, name=name)
            whole = Spectrum(*(t.to(p.device) for t in (whole.u, whole.s, whole.v)))
            paths[name] = "low_rank"
            delta = None
        else:
            delta = p.detach().to(dt) - theta_pre
            if float(delta.norm()) <= cfg.min_delta_norm:
                log.debug("rethink: layer %s has a zero difference vector, skipped", name)
                continue
            whole = decompose_dense(delta, compute_dtype=dt, name=name)
            paths[name] = "dense"
        spec = _truncate(whole, cfg.top_k)
        anchor = theta_pre
        if cfg.keep_tail and cfg.top_k is not None:
            full = delta if delta is not None else low_rank[name].dense(dt).to(p.device)
            anchor = theta_pre + (full - spec.matrix())
        states[name] = LayerState(
            name=name,
            anchor=anchor,
            spectrum=spec,
            gain=torch.ones_like(spec.s),
            origin=torch.arange(spec.rank, device=spec.s.device),
            drops_tail=spec.rank < whole.rank and not cfg.keep_tail,
        )
    return states, paths


def _iterate(
    model: nn.Module,
    params: Mapping[str, Tensor],
    base: Mapping[str, Tensor],
    states: dict[str, LayerState],
    batches: Sequence[Any],
    loss_fn: LossFn,
    cfg: RethinkConfig,
    progress_bar: ProgressBar | None,
    result: RethinkResult,
) -> None:
    """The ``T`` iterations (Sec. 4.2): re-decompose, learn Lambda, write the weights back."""
    gen = torch.Generator(device="cpu").manual_seed(int(cfg.seed))
    iter_bar = _bar(progress_bar, cfg, range(cfg.iterations), "rethink iterations")
    for t in iter_bar:
        if t > 0:
            _redecompose(states, params, base, cfg)
        lams = _init_lambdas(states, cfg, gen)
        with torch.enable_grad():  # callers (e.g. a model pool's loader) may run under no_grad
            epoch_losses = (
                _train(model, states, lams, batches, loss_fn, cfg, gen, t, progress_bar) if cfg.mode != "random" else []
            )
        result.lambdas.append({n: lam.detach().clone() for n, lam in lams.items()})
        result.sigmas.append({n: st.spectrum.s.detach().clone() for n, st in states.items()})
        result.losses.append(epoch_losses)
        if epoch_losses and hasattr(iter_bar, "set_postfix"):
            iter_bar.set_postfix(loss=f"{epoch_losses[-1]:.4g}")
        _write_back(states, params, lams, cfg)


def _bar(progress_bar: ProgressBar | None, cfg: RethinkConfig, it: Iterable, desc: str) -> Iterable:
    """``progress_bar(it, desc)`` when given and ``cfg.progress`` (e.g. ``tqdm``), else ``it``."""
    return progress_bar(it, desc) if progress_bar is not None and cfg.progress else it


def _init_lambdas(states: Mapping[str, LayerState], cfg: RethinkConfig, gen: torch.Generator) -> dict[str, Tensor]:
    lams = {}
    for name, st in states.items():
        s = st.spectrum.s
        if cfg.mode == "random":
            lo, hi = cfg.random_range
            r = torch.rand(st.spectrum.rank, generator=gen, dtype=torch.float64) * (hi - lo) + lo
            lams[name] = r.to(device=s.device, dtype=s.dtype)
        else:
            n = 1 if cfg.mode == "scalar" else st.spectrum.rank
            lams[name] = torch.ones(n, device=s.device, dtype=s.dtype, requires_grad=True)
    return lams


def _weights(model_params: Mapping[str, Tensor], states: Mapping[str, LayerState], lams: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: st.weight(lams[n]).to(model_params[n].dtype) for n, st in states.items()}


def _train(
    model: nn.Module,
    states: Mapping[str, LayerState],
    lams: Mapping[str, Tensor],
    batches: Sequence[Any],
    loss_fn: LossFn,
    cfg: RethinkConfig,
    gen: torch.Generator,
    t: int,
    progress_bar: ProgressBar | None = None,
) -> list[float]:
    """One iteration of eq. 13: Adam on the Lambdas over ``epochs`` passes of the calibration set."""
    if cfg.epochs == 0:
        return []
    if len(batches) == 0:
        raise ValueError("rethink: the calibration set is empty")
    params = _param_dict(model)
    opt = torch.optim.Adam(list(lams.values()), lr=cfg.lr)
    losses: list[float] = []
    bar = _bar(progress_bar, cfg, range(cfg.epochs), f"rethink iteration {t + 1}/{cfg.iterations}")
    for _epoch in bar:
        order = torch.randperm(len(batches), generator=gen).tolist() if cfg.shuffle else range(len(batches))
        total, count = 0.0, 0
        for i in order:
            opt.zero_grad(set_to_none=True)
            forward = Forward(model, _weights(params, states, lams))
            loss = loss_fn(forward, batches[i])
            if not torch.is_tensor(loss) or loss.ndim != 0:
                raise ValueError("rethink: loss_fn must return a scalar tensor")
            if not bool(torch.isfinite(loss)):
                raise NonFiniteLossError(f"rethink: non-finite calibration loss at iteration {t + 1}, epoch {_epoch + 1}, "
                                         f"batch {i} (lr {cfg.lr:g} too large?): lower the learning rate (--lr)")
            loss.backward()
            opt.step()
            total += float(loss.detach())
            count += 1
        losses.append(total / count)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
        log.debug("rethink: iteration %d epoch %d loss %.6g", t + 1, _epoch + 1, losses[-1])
    bad = [name for name, lam in lams.items() if not bool(torch.isfinite(lam).all())]
    if bad:  # the last step can overflow Lambda after a finite loss: never write that model
        raise NonFiniteLossError(f"rethink: Lambda of {bad[0]} became non-finite at iteration {t + 1} "
                                 f"(lr {cfg.lr:g} too large?): lower the learning rate (--lr)")
    log.info("rethink: iteration %d/%d, loss %.6g -> %.6g", t + 1, cfg.iterations, losses[0], losses[-1])
    return losses


@torch.no_grad()
def _write_back(states: Mapping[str, LayerState], params: Mapping[str, Tensor], lams: Mapping[str, Tensor], cfg: RethinkConfig) -> None:
    """theta^(t+1) = anchor + U diag(Lambda Sigma) V^T into the model (unchanged layers untouched),
    and the closed-form SVD of the new difference vector for the next iteration."""
    for name, st in states.items():
        lam = lams[name].detach()
        if bool((lam == 1).all()) and not st.drops_tail:
            continue  # Lambda = 1 exactly: the weight is the input merge, keep it bit for bit
        st.changed, st.drops_tail = True, False
        params[name].copy_(st.weight(lam).to(params[name].dtype))
        full = lam.expand_as(st.spectrum.s)
        st.gain[st.origin] = st.gain[st.origin] * full
        st.spectrum, order = st.spectrum.rescaled(lam)
        st.origin = st.origin[order]


@torch.no_grad()
def _redecompose(states: dict[str, LayerState], params: Mapping[str, Tensor], base: Mapping[str, Tensor], cfg: RethinkConfig) -> None:
    """Eq. 9-10 at iteration t >= 1. ``factored``: already done in closed form by
    :func:`_write_back`. ``dense``: SVD of ``theta^(t) - theta_pre`` from the stored weights."""
    if cfg.redecompose == "factored":
        return
    for name, st in states.items():
        p = params[name]
        theta_pre = base[name].to(device=p.device, dtype=cfg.compute_dtype)
        delta = p.to(cfg.compute_dtype) - (st.anchor if cfg.keep_tail and cfg.top_k is not None else theta_pre)
        spec = decompose_dense(delta, top_k=cfg.top_k, compute_dtype=cfg.compute_dtype, name=name)
        st.spectrum = spec
        # components no longer map one-to-one onto the first decomposition
        st.origin = torch.arange(spec.rank, device=spec.s.device)
        st.gain = torch.full_like(spec.s, float("nan"))

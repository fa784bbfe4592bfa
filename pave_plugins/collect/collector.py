"""Forward pre-hooks that accumulate ``C = X^T X`` at the input of every linear layer.

For a layer ``y = W x`` (``W`` is ``out x in``), PAVE (eq. 5-6 of the paper, ``W C`` with
``C = X X^T``, ``X`` = ``in x N`` inputs) needs ``C = sum_t x_t x_t^T`` over the non-padding tokens
``t`` that the fine-tuned model saw. Rows of the hooked input are tokens, so the accumulation is one
matrix product per distinct input per batch: ``C += X_b^T X_b`` (``addmm_`` into the accumulator).

Which layers: ``torch.nn.Linear`` (and subclasses), transformers' GPT-2 ``Conv1D`` (its weight is
stored ``in x out``: recorded as ``weight_layout = "in_out"`` in the layer info), and PEFT-wrapped
linears, whose covariance is the base layer's input; their names are the names of the *merged* model
(``base_model.model.`` and ``.base_layer`` stripped), so that they match the checkpoint written after
``merge_and_unload()``. PEFT's adapter-internal linears (``lora_A``, ``lora_B``, ...) are skipped.

Deduplication: layers that read the *same input tensor object* in a forward pass (q/k/v, gate/up)
share one covariance. The identity is checked with a weak reference to the tensor and its version
counter (so a freed tensor whose memory is reused is never taken for a shared input, and no input is
kept alive by the collector). The sharing found in the first batch that calls a layer is checked in
every later batch.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pave_plugins.io.covariance import (
    CovarianceFileError,
    CovarianceMetadata,
    resolve_layer_name,
    save_covariances,
)
from pave_plugins.io.layers import HookedLayer, LayerFilter, hookable_layers

log = logging.getLogger(__name__)

class CollectionError(RuntimeError):
    """Covariance collection cannot proceed (no hookable layer, bad batch, inconsistent sharing)."""


# --------------------------------------------------------------------------- the result


@dataclass
class CovarianceSet:
    """Per-layer input covariances of one model (the in-memory form of a covariance file).

    ``covariances``: ``{key: C}`` one ``in x in`` matrix per distinct input; ``layer_map``:
    ``{module name: key}``; ``counts``: ``{key: tokens accumulated}``; ``layer_info``:
    ``{module name: {"type", "weight_layout" ("out_in" or "in_out" for GPT-2 Conv1D), "in_features"}}``.
    """

    covariances: dict[str, Tensor]
    layer_map: dict[str, str]
    counts: dict[str, int] = field(default_factory=dict)
    n_samples: int = 0
    n_tokens: int = 0
    dtype: str = "float64"
    layer_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    unmasked_layers: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    origin: str = "collected covariances"  # named in messages

    # lookup (same semantics as CovarianceFile)
    @property
    def layers(self) -> list[str]:
        return sorted(self.layer_map)

    @property
    def fingerprint(self) -> str:
        return ""

    def key_sizes(self) -> dict[str, int]:
        return {k: int(v.shape[0]) for k, v in self.covariances.items()}

    def resolve(self, name: str) -> str | None:
        """Layer name of this set for a layer or weight name (tolerates a model prefix), or ``None``."""
        return resolve_layer_name(name, self.layer_map, "collected covariances")

    def __contains__(self, name: str) -> bool:
        return self.resolve(name) is not None

    def key_for(self, name: str) -> str:
        layer = self.resolve(name)
        if layer is None:
            raise CovarianceFileError(f"collected covariances: no covariance for layer {name!r}")
        return self.layer_map[layer]

    def get(self, name: str, *, device: torch.device | str | None = None) -> Tensor:
        """Covariance ``C`` (``in x in``) of a layer, given its module name or ``<module>.weight``."""
        cov = self.covariances[self.key_for(name)]
        return cov if device is None else cov.to(device)

    def to(self, device: torch.device | str) -> "CovarianceSet":
        self.covariances = {k: v.to(device) for k, v in self.covariances.items()}
        return self

    def metadata(
        self,
        *,
        model_path: str = "",
        model_fingerprint: str = "",
        max_length: int | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> CovarianceMetadata:
        ext: dict[str, Any] = {"layers": self.layer_info}
        if self.unmasked_layers:
            ext["unmasked_layers"] = list(self.unmasked_layers)
        if self.stats:
            ext["collection"] = dict(self.stats)
        ext.update(dict(extra or {}))
        return CovarianceMetadata(
            layer_map=dict(self.layer_map),
            counts=dict(self.counts),
            n_samples=int(self.n_samples),
            n_tokens=int(self.n_tokens),
            dtype=self.dtype,
            max_length=max_length,
            model_path=str(model_path),
            model_fingerprint=model_fingerprint,
            extra=ext,
        )

    def save(
        self,
        path: str | Path,
        *,
        model_path: str = "",
        model_fingerprint: str = "",
        max_length: int | None = None,
        extra: Mapping[str, Any] | None = None,
        overwrite: bool = True,
        inputs: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write a covariance file through the output transaction (see :func:`save_covariances`)."""
        meta = self.metadata(
            model_path=model_path, model_fingerprint=model_fingerprint, max_length=max_length, extra=extra
        )
        return save_covariances(path, self.covariances, meta, overwrite=overwrite, inputs=inputs)

    def __add__(self, other: "CovarianceSet") -> "CovarianceSet":
        """Sum of two sets collected on the same model (parts of one data set)."""
        if self.layer_map != other.layer_map:
            diff = sorted(set(self.layer_map.items()) ^ set(other.layer_map.items()))
            raise CovarianceFileError(f"cannot add covariance sets with different layer maps (differ at {diff[:4]})")
        covs = {}
        for k, c in self.covariances.items():
            o = other.covariances[k]
            if o.shape != c.shape:
                raise CovarianceFileError(f"covariance {k!r}: shapes differ {tuple(c.shape)} vs {tuple(o.shape)}")
            covs[k] = c + o.to(device=c.device, dtype=c.dtype)
        return CovarianceSet(
            covariances=covs,
            layer_map=dict(self.layer_map),
            counts={k: self.counts.get(k, 0) + other.counts.get(k, 0) for k in covs},
            n_samples=self.n_samples + other.n_samples,
            n_tokens=self.n_tokens + other.n_tokens,
            dtype=self.dtype,
            layer_info={**other.layer_info, **self.layer_info},
            unmasked_layers=sorted(set(self.unmasked_layers) | set(other.unmasked_layers)),
        )


# --------------------------------------------------------------------------- the collector


class CovarianceCollector:
    """Context manager: hooks the layers, then :meth:`step` runs one batch and accumulates.

    >>> with CovarianceCollector(model) as col:
    ...     for batch in batches:
    ...         col.step(batch)
    >>> covs = col.result()
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        accumulate_dtype: torch.dtype = torch.float64,
        compute_dtype: torch.dtype | None = None,
        accumulate_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
        layer_filter: LayerFilter = None,
        dedupe: bool = True,
    ):
        if accumulate_dtype not in (torch.float64, torch.float32):
            raise ValueError(f"accumulate_dtype must be torch.float64 or torch.float32, got {accumulate_dtype}")
        self.model = model
        self.accumulate_dtype = accumulate_dtype
        self.compute_dtype = compute_dtype or accumulate_dtype
        if self.compute_dtype not in (torch.float64, torch.float32):
            raise ValueError(f"compute_dtype must be torch.float64 or torch.float32, got {compute_dtype}")
        self.device = None if device is None else torch.device(device)
        self.dedupe = dedupe
        self.layers = hookable_layers(model, layer_filter)
        if not self.layers:
            raise CollectionError(
                f"{type(model).__name__} has no linear layer to hook (nn.Linear, GPT-2 Conv1D or PEFT-wrapped)"
                + (" that passes layer_filter" if layer_filter is not None else "")
            )
        if accumulate_device in (None, "auto"):
            accumulate_device = self._auto_accumulate_device()
        self.accumulate_device = None if accumulate_device is None else torch.device(accumulate_device)
        self.layer_map: dict[str, str] = {}
        self.owner: dict[str, str] = {}  # key -> layer that created it
        self.acc: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self.n_samples = 0
        self.n_tokens = 0
        self.unmasked: set[str] = set()
        self._handles: list[Any] = []
        self._reset_batch(None)

    def _auto_accumulate_device(self) -> str | None:
        """``None`` (each layer's device) when the accumulators fit in half the free GPU memory, else ``"cpu"``."""
        need: dict[torch.device, int] = {}
        item = torch.finfo(self.accumulate_dtype).bits // 8
        for h in self.layers:
            w = getattr(h.module, "weight", None)
            if w is not None and w.device.type == "cuda":
                need[w.device] = need.get(w.device, 0) + h.in_features**2 * item  # upper bound (before dedupe)
        for dev, n in need.items():
            free, _ = torch.cuda.mem_get_info(dev)
            if n > 0.5 * free:
                log.warning(
                    "covariances need up to %.1f GiB on %s (%.1f GiB free): accumulating on the CPU "
                    "(one device-to-host copy per layer and batch)", n / 2**30, dev, free / 2**30
                )
                return "cpu"
        return None

    # -- hooks
    def __enter__(self) -> "CovarianceCollector":
        for h in self.layers:
            self._handles.append(h.module.register_forward_pre_hook(self._make_hook(h), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _reset_batch(self, mask: Tensor | None) -> None:
        self._mask_shape: tuple[int, ...] | None = None
        self._mask_idx: Tensor | None = None
        if mask is not None:
            self._mask_shape = tuple(mask.shape)
            flat = mask.reshape(-1).bool()
            if not bool(flat.all()):
                self._mask_idx = flat.nonzero().squeeze(1)
        # id(tensor) -> (weakref, version, {keys it was accumulated into})
        self._seen: dict[int, tuple[Any, int, set[str]]] = {}
        self._new_keys: set[str] = set()

    def _make_hook(self, h: HookedLayer) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            if torch.is_tensor(x):
                self._observe(h, x)

        return hook

    def _observe(self, h: HookedLayer, x: Tensor) -> None:
        ident = id(x)
        ent = self._seen.get(ident)
        if ent is not None and (ent[0]() is not x or ent[1] != x._version):
            ent = None  # a different tensor at a reused id, or modified in place
        key = self.layer_map.get(h.name)
        if key is None:
            if self.dedupe and ent is not None:
                shared = [k for k in ent[2] if k in self._new_keys]
                if shared:
                    self.layer_map[h.name] = shared[0]
                    return
            key = f"cov.{len(self.owner)}"
            self.layer_map[h.name] = key
            self.owner[key] = h.name
            self._new_keys.add(key)
        if ent is not None and key in ent[2]:
            return  # this input is already in this covariance (shared q/k/v input)
        if self.owner[key] != h.name:
            raise CollectionError(
                f"layer {h.name!r} shared its input with {self.owner[key]!r} in an earlier batch but not in this one; "
                "collect with dedupe=False"
            )
        self._accumulate(h, key, x)
        if ent is None:
            try:
                ref = weakref.ref(x)
            except TypeError:  # pragma: no cover - tensors support weak references
                return
            self._seen[ident] = (ref, x._version, {key})
        else:
            ent[2].add(key)

    def _accumulate(self, h: HookedLayer, key: str, x: Tensor) -> None:
        d = x.shape[-1]
        if d != h.in_features:
            raise CollectionError(f"layer {h.name!r}: input has {d} features, the layer expects {h.in_features}")
        lead = tuple(x.shape[:-1])
        rows = x.reshape(-1, d)
        if self._mask_shape is not None and self._mask_idx is not None:
            if lead == self._mask_shape or (len(lead) == 1 and lead[0] == _prod(self._mask_shape)):
                idx = self._mask_idx if self._mask_idx.device == rows.device else self._mask_idx.to(rows.device)
                rows = rows.index_select(0, idx)
            else:
                self.unmasked.add(h.name)
        rows = rows.detach().to(self.compute_dtype)
        acc = self.acc.get(key)
        if acc is None:
            dev = self.accumulate_device or rows.device
            acc = self.acc[key] = torch.zeros(d, d, dtype=self.accumulate_dtype, device=dev)
            self.counts[key] = 0
        if acc.device == rows.device and acc.dtype == rows.dtype:
            acc.addmm_(rows.T, rows)
        else:
            acc += (rows.T @ rows).to(device=acc.device, dtype=acc.dtype)
        self.counts[key] += int(rows.shape[0])

    # -- batches
    def input_device(self) -> torch.device:
        if self.device is not None:
            return self.device
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def step(self, batch: Any) -> int:
        """Run the model on one batch and accumulate; returns the number of non-padding tokens."""
        dev = self.input_device()
        mask = None
        if isinstance(batch, Mapping):
            kwargs = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items() if torch.is_tensor(v)}
            if not kwargs:
                raise CollectionError(f"batch has no tensor (keys {sorted(batch)})")
            mask = kwargs.get("attention_mask")
            ref = kwargs.get("input_ids", next(iter(kwargs.values())))
            n_samples = int(ref.shape[0]) if ref.dim() else 1
            n_tokens = int(mask.sum()) if mask is not None else int(ref.shape[0] * ref.shape[1]) if ref.dim() > 1 else n_samples
            call = lambda: self.model(**kwargs)  # noqa: E731
        elif torch.is_tensor(batch) or (isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0])):
            x = (batch if torch.is_tensor(batch) else batch[0]).to(dev)
            n_samples = int(x.shape[0])
            n_tokens = int(x.shape[0] * x.shape[1]) if x.dim() == 2 and not x.is_floating_point() else n_samples
            call = lambda: self.model(x)  # noqa: E731
        else:
            raise CollectionError(
                f"a batch must be a dict of model inputs (input_ids, attention_mask, ...) or a tensor, got {type(batch).__name__}"
            )
        self._reset_batch(mask)
        try:
            call()
        finally:
            self._reset_batch(None)
        self.n_samples += n_samples
        self.n_tokens += n_tokens
        return n_tokens

    def _check_finite(self) -> None:
        """A sum of ``x x^T`` is finite unless the layer's inputs overflowed: refuse it, naming the layer."""
        from pave_plugins.core.purify import all_finite

        for key, acc in self.acc.items():
            if not all_finite(acc):
                layers = sorted(n for n, k in self.layer_map.items() if k == key)
                raise CollectionError(
                    f"layer {layers[0] if layers else key}: the inputs it saw hold NaN or Inf (the model's activations "
                    "overflow in half precision?): nothing was written; collect with --model-dtype float32 or bfloat16"
                )

    def result(self) -> CovarianceSet:
        if not self.acc:
            raise CollectionError("no covariance was collected: no batch was given, or no hooked layer was called")
        info = {
            h.name: {
                "type": h.kind,
                "weight_layout": "in_out" if h.kind == "Conv1D" else "out_in",
                "in_features": h.in_features,
            }
            for h in self.layers
            if h.name in self.layer_map
        }
        self._check_finite()
        missing = [h.name for h in self.layers if h.name not in self.layer_map]
        if missing:
            log.warning("%d hooked layer(s) were never called, no covariance: %s", len(missing), missing[:5])
        if self.unmasked:
            log.info(
                "%d layer(s) got inputs not shaped like the attention mask (pooled, cross-attention or routed "
                "inputs): all their rows were counted: %s", len(self.unmasked), sorted(self.unmasked)[:5]
            )
        return CovarianceSet(
            covariances=dict(self.acc),
            layer_map=dict(self.layer_map),
            counts=dict(self.counts),
            n_samples=self.n_samples,
            n_tokens=self.n_tokens,
            dtype=str(self.accumulate_dtype).replace("torch.", ""),
            layer_info=info,
            unmasked_layers=sorted(self.unmasked),
        )


def _prod(shape: Iterable[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def peak_memory(device: torch.device | str | None = None) -> dict[str, float]:
    """Peak memory so far: ``{"device_gib": ..., "host_rss_gib": ...}``."""
    out: dict[str, float] = {}
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        out["device_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["host_rss_gib"] = rss / (2**30 if sys.platform == "darwin" else 2**20)
    except Exception:  # pragma: no cover - not on every platform
        pass
    return out


@torch.no_grad()
def collect_covariances(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    accumulate_dtype: torch.dtype = torch.float64,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    accumulate_device: torch.device | str | None = None,
    progress: bool = True,
    layer_filter: LayerFilter = None,
    dedupe: bool = True,
    total: int | None = None,
) -> CovarianceSet:
    """Input covariances ``C = sum_t x_t x_t^T`` of every linear layer of ``model`` over ``batches``.

    Args:
        model: the fine-tuned model k (PAVE feeds task k's data to model k itself); a plain
            transformers model, a PEFT model (covariances of the base layers' inputs, named as in
            the merged model) or any ``nn.Module`` with linear layers.
        batches: iterable of dicts of model inputs as a tokenizer returns them (``input_ids``,
            ``attention_mask``, ...; padding positions, ``attention_mask == 0``, are excluded), or of
            input tensors / ``(inputs, labels)`` tuples.
        accumulate_dtype: ``torch.float64`` (default) or ``torch.float32``; never half precision.
        compute_dtype: dtype of the per-batch ``X^T X`` product (default: ``accumulate_dtype``).
        device: where batch tensors are moved (default: the device of the model's first parameter).
        accumulate_device: where the accumulators live; default (``None`` / ``"auto"``): the device of
            each layer's input when they fit in half the free GPU memory, else ``"cpu"`` (per-batch
            products are computed on the GPU and added on the host).
        progress: tqdm bar with tokens/s.
        layer_filter: regex on layer names, or ``(name, module) -> bool``.
        dedupe: store one covariance per distinct input tensor (q/k/v, gate/up share one).
        total: number of batches, for the progress bar when ``batches`` has no ``len``.

    Returns:
        A :class:`CovarianceSet`; ``.save(path, ...)`` writes a covariance file.
    """
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        with CovarianceCollector(
            model,
            accumulate_dtype=accumulate_dtype,
            compute_dtype=compute_dtype,
            accumulate_device=accumulate_device,
            device=device,
            layer_filter=layer_filter,
            dedupe=dedupe,
        ) as col:
            _feed(col, batches, progress=progress, total=total, t0=t0)
            out = col.result()
    finally:
        model.train(was_training)
    elapsed = time.perf_counter() - t0
    dev = col.input_device()
    out.stats = {
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(out.n_tokens / max(elapsed, 1e-9), 1),
        **{k: round(v, 3) for k, v in peak_memory(dev).items()},
    }
    log.info(
        "collected %d covariances for %d layers from %d samples / %d tokens in %.1f s (%.0f tokens/s); peak memory %s",
        len(out.covariances), len(out.layer_map), out.n_samples, out.n_tokens, elapsed,
        out.stats["tokens_per_s"], {k: f"{v:.2f} GiB" for k, v in peak_memory(dev).items()},
    )
    return out


def _feed(col: CovarianceCollector, batches: Iterable[Any], *, progress: bool, total: int | None, t0: float) -> None:
    """Every batch through the collector, with a tokens/s progress bar."""
    if total is None:
        try:
            total = len(batches)  # type: ignore[arg-type]
        except TypeError:
            total = None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="collect covariances", unit="batch")
    for batch in batches:
        col.step(batch)
        if bar is not None:
            el = max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(tokens=col.n_tokens, tok_s=f"{col.n_tokens / el:.0f}", refresh=False)
    if bar is not None:
        bar.close()

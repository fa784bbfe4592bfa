"""Covariance files: sum parts collected separately, and check a file against a model."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pave_plugins.io.covariance import CovarianceFile, CovarianceFileError, CovarianceMetadata, save_covariances
from pave_plugins.io.sources import FINGERPRINT_POLICIES, CovarianceSource

log = logging.getLogger(__name__)


def sum_covariance_files(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    allow_different_models: bool = False,
    overwrite: bool = True,
) -> Path:
    """Sum covariance files collected in parts (different samples, same model) into ``out``.

    Checks: same layer map, tensor shapes and dtype; same model fingerprint (unless
    ``allow_different_models``); every file has a token count for every covariance. The counts,
    ``n_samples`` and ``n_tokens`` are added; ``max_length`` must agree (else it is dropped with a
    warning). Written atomically.
    """
    if len(paths) < 2:
        raise ValueError(f"--merge needs at least two covariance files, got {len(paths)}")
    resolved = [Path(p).resolve() for p in paths]
    dups = sorted({str(p) for p in resolved if resolved.count(p) > 1})
    if dups:
        raise ValueError(f"covariance file(s) given more than once: {dups} (each part must be counted once)")
    files = [CovarianceFile(p) for p in paths]
    first = files[0]
    m0 = first.metadata
    for f in files:
        m = f.metadata
        missing = sorted(set(m.layer_map.values()) - set(m.counts))
        if missing:
            raise CovarianceFileError(f"{f.path}: no token count for covariance(s) {missing[:4]}")
        if f is first:
            continue
        if m.layer_map != m0.layer_map:
            diff = sorted(set(m.layer_map.items()) ^ set(m0.layer_map.items()))[:4]
            raise CovarianceFileError(f"{f.path} and {first.path} have different layer maps (differ at {diff})")
        if m.dtype != m0.dtype:
            raise CovarianceFileError(f"{f.path} is {m.dtype}, {first.path} is {m0.dtype}")
        if m.model_fingerprint != m0.model_fingerprint and not allow_different_models:
            raise CovarianceFileError(
                f"{f.path} and {first.path} were collected on different models (fingerprints "
                f"{m.model_fingerprint or '-'} vs {m0.model_fingerprint or '-'}); pass allow_different_models to sum anyway"
            )
    max_lengths = {f.metadata.max_length for f in files}
    max_length = m0.max_length if len(max_lengths) == 1 else None
    if len(max_lengths) > 1:
        log.warning("the parts were collected with different max lengths %s", sorted(map(str, max_lengths)))
    from safetensors import safe_open

    keys = sorted(set(m0.layer_map.values()))
    total: dict[str, Tensor] = {}
    for key in keys:
        acc: Tensor | None = None
        for f in files:
            with safe_open(str(f.path), framework="pt", device="cpu") as h:
                t = h.get_tensor(key)
            if acc is not None and t.shape != acc.shape:
                raise CovarianceFileError(f"{f.path}: covariance {key!r} has shape {tuple(t.shape)}, expected {tuple(acc.shape)}")
            acc = t.clone() if acc is None else acc.add_(t)
        total[key] = acc  # type: ignore[assignment]
    meta = CovarianceMetadata(
        layer_map=dict(m0.layer_map),
        counts={k: sum(f.metadata.counts[k] for f in files) for k in keys},
        n_samples=sum(f.metadata.n_samples for f in files),
        n_tokens=sum(f.metadata.n_tokens for f in files),
        dtype=m0.dtype,
        max_length=max_length,
        model_path=m0.model_path,
        model_fingerprint=m0.model_fingerprint,
        extra={**m0.extra, "collection": {"parts": [str(f.path) for f in files]}},
    )
    log.info("summed %d covariance files: %d samples, %d tokens -> %s", len(files), meta.n_samples, meta.n_tokens, out)
    return save_covariances(out, total, meta, overwrite=overwrite, inputs={"--merge": list(paths)})


def _weight_in_features(
    model: nn.Module | Mapping[str, Any] | str | os.PathLike,
) -> tuple[dict[str, Any], Callable[[], str]]:
    """``{layer name: input features}`` of a model (module, state dict or checkpoint dir), and a
    function computing its fingerprint (only when a file carries one to compare)."""
    from .collector import hookable_layers
    from .fingerprint import model_fingerprint

    fingerprint = functools.cache(lambda: model_fingerprint(model))
    if isinstance(model, nn.Module):
        return {h.name: h.in_features for h in hookable_layers(model)}, fingerprint
    shapes: dict[str, tuple[int, ...]] = {}
    if isinstance(model, Mapping):
        shapes = {k: tuple(v.shape) for k, v in model.items() if torch.is_tensor(v)}
    else:
        from safetensors import safe_open

        from pave_plugins.io.checkpoints import weight_files

        path = Path(model)
        if path.is_dir():
            kind, files = weight_files(path)
            files = files if kind == "safetensors" else []
        else:
            files = [path]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"no safetensors weights in {path}")
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    shapes[k] = tuple(h.get_slice(k).get_shape())
    dims = {k[: -len(".weight")]: s for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2}
    # both layouts are returned; the caller picks with the file's layer info (GPT-2 Conv1D is in x out)
    return {k: (s[1], s[0]) for k, s in dims.items()}, fingerprint


def check_covariance_file(
    cov: CovarianceSource | str | os.PathLike,
    model: nn.Module | Mapping[str, Any] | str | os.PathLike,
    *,
    on_fingerprint_mismatch: str = "error",
    values: bool = False,
) -> CovarianceSource:
    """The one fit check of every face: do these covariances belong to ``model``?

    ``cov`` is a covariance source (a file of ``pave collect`` or collected covariances) or a file
    path; ``model`` a module, a state dict or a checkpoint folder. Its layers must exist in the model
    with the right input size (a few absent layers, such as a head tied to the embeddings, are a
    warning; most absent is an error), and the weights' fingerprint must match
    (``on_fingerprint_mismatch``: ``"error"``, ``"warn"`` or ``"ignore"``).
    With ``values`` every matrix is also read and checked as a covariance must be (finite,
    symmetric, positive semi-definite up to round-off: ``pave collect --check``); without, each is
    checked when it is used. Raises :class:`CovarianceFileError` naming the source and the layer.
    """
    if on_fingerprint_mismatch not in FINGERPRINT_POLICIES:
        raise ValueError(f"on_fingerprint_mismatch must be error, warn or ignore, got {on_fingerprint_mismatch!r}")
    f = cov if isinstance(cov, CovarianceSource) else CovarianceFile(cov)
    dims, fingerprint = _weight_in_features(model)
    _check_layers(f, dims)
    want = f.fingerprint
    if want and on_fingerprint_mismatch != "ignore" and want != fingerprint():
        msg = (
            f"{f.origin}: collected on weights with fingerprint {want}, the model has {fingerprint()} "
            f"(same layer shapes: another fine-tune or a different dtype copy?)"
        )
        if on_fingerprint_mismatch == "error":
            raise CovarianceFileError(msg + "; pass on_fingerprint_mismatch='warn' to use it anyway")
        log.warning("%s", msg)
    if values:
        check_values(f)
    return f


def check_values(f: CovarianceSource) -> None:
    """Every covariance of ``f`` passes :func:`pave_plugins.core.purify.validated_covariance` with the
    eigenvalue check; else :class:`CovarianceFileError` naming the source, key and layer."""
    from pave_plugins.core.purify import validated_covariance

    by_key: dict[str, str] = {}
    for layer in f.layers:
        by_key.setdefault(f.key_for(layer), layer)
    for key, layer in sorted(by_key.items()):
        try:
            validated_covariance(f.get(layer), semidefinite=True, name=f"{f.origin}: covariance {key!r} (layer {layer!r})")
        except ValueError as exc:
            raise CovarianceFileError(str(exc)) from None


def _check_layers(f: CovarianceSource, dims: Mapping[str, Any]) -> None:
    """Every layer of ``f`` is a layer of the model taking as many inputs as its covariance is wide."""
    from pave_plugins.io.covariance import resolve_layer_name

    info = f.layer_info
    sizes = f.key_sizes()
    absent = []
    for layer in f.layers:
        target = resolve_layer_name(layer, dims, f.origin)
        if target is None:
            absent.append(layer)
            continue
        d = dims[target]
        if isinstance(d, tuple):  # (in of out x in, in of in x out)
            d = d[1] if info.get(layer, {}).get("weight_layout") == "in_out" else d[0]
        n = sizes[f.key_for(layer)]
        if n != d:
            raise CovarianceFileError(
                f"{f.origin}: covariance of layer {layer!r} is {n} x {n} but the model's "
                f"{target!r} takes {d} input features: this file was collected on another model"
            )
    if absent and len(absent) * 2 <= len(f.layers):
        # a few missing layers: usually a head tied to the embeddings (saved once, under the embedding's name)
        log.warning("%s: %d layer(s) of the file have no weight of their own in the model (tied heads?): %s",
                    f.origin, len(absent), absent[:4])
    elif absent:
        raise CovarianceFileError(
            f"{f.origin}: {len(absent)} layer(s) of the file are not in the model, e.g. {absent[:4]}: "
            "this file was collected on another model"
        )

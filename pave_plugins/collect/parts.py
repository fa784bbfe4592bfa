"""Covariance files: sum parts collected separately, and check a file against a model."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from pave_plugins.io.covariance import CovarianceFile, CovarianceFileError, CovarianceMetadata, save_covariances

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



"""Covariance files: one safetensors file per fine-tuned model.

Layout (format ``pave-covariance``, version 1):

* tensors ``cov.<i>`` (``in x in``, float64 or float32): one per distinct layer *input*; layers
  that read the same input tensor (q/k/v, gate/up) share one entry;
* safetensors metadata (all strings): ``format``, ``format_version``, ``layer_map`` (JSON
  ``{layer module name: tensor key}``), ``counts`` (JSON ``{tensor key: tokens seen}``),
  ``n_samples``, ``n_tokens``, ``dtype``, ``max_length``, ``model_path``, ``model_fingerprint``,
  and ``extra`` (JSON, free-form).

Layer names are module names (``model.layers.0.self_attn.q_proj``); the weight they serve is
``<layer>.weight``. Lookups by a checkpoint tensor name tolerate a different model prefix
(``bert.encoder...`` vs ``encoder...``) when the match is unique.

Reading is lazy: :class:`CovarianceFile` opens the file with ``safe_open`` and loads one
covariance at a time, so a merge never holds a whole set in memory.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .output import Inputs, output_file

logger = logging.getLogger("pave_plugins.io.covariance")

FORMAT = "pave-covariance"
FORMAT_VERSION = "1"


class CovarianceFileError(ValueError):
    """A covariance file is missing, corrupt, or does not fit the model it is used with."""


#: safetensors dtype codes of half-precision covariances (used with a warning)
LOW_PRECISION = {"F16": "float16", "BF16": "bfloat16"}


class MissingCovarianceError(CovarianceFileError):
    """A layer that other models purify has no covariance for some model (see ``allow_missing_covariance``)."""


@dataclass
class CovarianceMetadata:
    layer_map: dict[str, str]
    counts: dict[str, int] = field(default_factory=dict)
    n_samples: int = 0
    n_tokens: int = 0
    dtype: str = "float64"
    max_length: int | None = None
    model_path: str = ""
    model_fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_strings(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "layer_map": json.dumps(self.layer_map, sort_keys=True),
            "counts": json.dumps(self.counts, sort_keys=True),
            "n_samples": str(int(self.n_samples)),
            "n_tokens": str(int(self.n_tokens)),
            "dtype": self.dtype,
            "max_length": "" if self.max_length is None else str(int(self.max_length)),
            "model_path": str(self.model_path),
            "model_fingerprint": self.model_fingerprint,
            "extra": json.dumps(self.extra, sort_keys=True, default=str),
        }

    def _check_types(self) -> None:
        """The metadata schema: a ``TypeError`` naming the first field of the wrong type."""
        if not isinstance(self.layer_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.layer_map.items()):
            raise TypeError("layer_map must be a JSON object {layer name: tensor key} of strings")
        if not isinstance(self.counts, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                for k, v in self.counts.items()):
            raise TypeError("counts must be a JSON object {tensor key: token count} of non-negative integers")
        if not isinstance(self.extra, dict):
            raise TypeError("extra must be a JSON object")
        if self.n_samples < 0 or self.n_tokens < 0 or (self.max_length is not None and self.max_length < 1):
            raise TypeError("n_samples and n_tokens must be non-negative and max_length positive")

    @classmethod
    def from_strings(cls, meta: Mapping[str, str], path: str | os.PathLike = "") -> "CovarianceMetadata":
        if meta.get("format") != FORMAT:
            raise CovarianceFileError(f"{path}: not a pave covariance file (format={meta.get('format')!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise CovarianceFileError(
                f"{path}: covariance format version {meta.get('format_version')!r} is not supported "
                f"(this pave_plugins reads version {FORMAT_VERSION})"
            )
        try:
            out = cls(
                layer_map=json.loads(meta["layer_map"]),
                counts=json.loads(meta.get("counts", "{}")),
                n_samples=int(meta.get("n_samples", "0")),
                n_tokens=int(meta.get("n_tokens", "0")),
                dtype=meta.get("dtype", "float64"),
                max_length=int(meta["max_length"]) if meta.get("max_length") else None,
                model_path=meta.get("model_path", ""),
                model_fingerprint=meta.get("model_fingerprint", ""),
                extra=json.loads(meta.get("extra", "{}")),
            )
            out._check_types()
            return out
        except (KeyError, ValueError, TypeError) as exc:
            raise CovarianceFileError(f"{path}: corrupt covariance metadata ({exc})") from exc


def save_covariances(
    path: str | os.PathLike,
    covariances: Mapping[str, torch.Tensor],
    metadata: CovarianceMetadata,
    *,
    overwrite: bool = True,
    inputs: Inputs | None = None,
    flag: str = "-o/--out",
) -> Path:
    """Write ``{tensor key: C}`` and metadata through the output transaction
    (:func:`pave_plugins.io.output.output_file`): never onto or inside ``inputs``, an existing file
    replaced only with ``overwrite`` and only when it is a covariance file."""
    path = Path(path)
    missing = sorted(set(metadata.layer_map.values()) - set(covariances))
    if missing:
        raise ValueError(f"layer_map points to covariance keys that are not given: {missing[:5]}")
    tensors = {}
    for key, cov in covariances.items():
        if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
            raise ValueError(f"covariance {key!r} must be square, got {tuple(cov.shape)}")
        tensors[key] = cov.detach().to("cpu").contiguous()
    with output_file(path, who="pave collect", inputs=inputs, overwrite=overwrite, flag=flag,
                     replaceable=is_covariance_file) as tmp:
        save_file(tensors, str(tmp), metadata=metadata.to_strings())
    return path


def is_covariance_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file written by ``pave collect`` (its header says so)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # not safetensors at all
        return False


def _layer_of(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def resolve_layer_name(name: str, layer_map: Mapping[str, str], where: str = "covariances") -> str | None:
    """Layer of ``layer_map`` for a layer or weight name, tolerating a different model prefix.

    ``model.layers.0.mlp.up_proj.weight`` and ``layers.0.mlp.up_proj`` both find
    ``model.layers.0.mlp.up_proj``; an ambiguous suffix match raises :class:`CovarianceFileError`.
    """
    layer = _layer_of(name)
    if layer in layer_map:
        return layer
    candidates = [k for k in layer_map if layer.endswith("." + k) or k.endswith("." + layer)]
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        raise CovarianceFileError(f"{where}: {name!r} matches several layers: {candidates[:4]}")
    return None


def not_a_covariance_file(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be a covariance file (a folder, nothing there), or None."""
    if Path(path).is_dir():
        return f"{path} is a folder, not a covariance file: give the file of pave collect for this model"
    if not Path(path).is_file():
        return f"covariance file not found: {path}"
    return None


class CovarianceFile:
    """Lazy reader of a covariance file. ``get(name)`` accepts a layer or a weight tensor name."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        problem = not_a_covariance_file(self.path)
        if problem:
            raise CovarianceFileError(problem)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                self._keys = set(f.keys())
                dtypes = {k: f.get_slice(k).get_dtype() for k in self._keys}
                stored = sorted(set(dtypes.values()))
        except Exception as exc:  # safetensors raises several types for corrupt headers
            raise CovarianceFileError(f"{self.path}: cannot read covariance file ({exc})") from exc
        self.metadata = CovarianceMetadata.from_strings(meta, self.path)
        absent = sorted(set(self.metadata.layer_map.values()) - self._keys)
        if absent:
            raise CovarianceFileError(f"{self.path}: layer_map names tensors that are missing: {absent[:5]}")
        not_float = sorted(k for k, d in dtypes.items() if not str(d).upper().startswith(("F", "BF")))
        if not_float:
            raise CovarianceFileError(f"{self.path}: covariance {not_float[0]!r} is stored as {dtypes[not_float[0]]}, "
                                      "not as floating point: not a file of pave collect")
        low = [d for d in stored if d in LOW_PRECISION]
        if low:
            logger.warning("%s: covariances stored in %s: their rounding changes the singular values and so the ranks "
                           "Algorithm 1 keeps; collect them in float64 (pave collect's default) or float32",
                           self.path, LOW_PRECISION[low[0]])

    @property
    def layers(self) -> list[str]:
        return sorted(self.metadata.layer_map)

    @property
    def origin(self) -> str:
        return str(self.path)

    @property
    def fingerprint(self) -> str:
        return self.metadata.model_fingerprint

    @property
    def counts(self) -> dict[str, int]:
        """``{key: tokens accumulated}`` (RegMean's ``mean`` Gram weighting divides by it)."""
        return self.metadata.counts

    @property
    def layer_info(self) -> dict[str, Any]:
        """``{layer: {"weight_layout", "in_features", ...}}`` as written by ``pave collect`` (or ``{}``)."""
        info = self.metadata.extra.get("layers", {}) if isinstance(self.metadata.extra, dict) else {}
        return info if isinstance(info, dict) else {}

    def key_sizes(self) -> dict[str, int]:
        """``{key: n}`` of the ``n x n`` covariances, from the header (no matrix is loaded)."""
        with safe_open(str(self.path), framework="pt") as f:
            return {k: int(f.get_slice(k).get_shape()[0]) for k in set(self.metadata.layer_map.values())}

    def resolve(self, name: str) -> str | None:
        """Layer name in this file for a layer or weight name, or ``None`` if it has none."""
        # tolerates a model prefix on either side (e.g. "bert." or "model."), if unique
        return resolve_layer_name(name, self.metadata.layer_map, str(self.path))

    def __contains__(self, name: str) -> bool:
        return self.resolve(name) is not None

    def key_for(self, name: str) -> str:
        layer = self.resolve(name)
        if layer is None:
            raise CovarianceFileError(f"{self.path}: no covariance for layer {_layer_of(name)!r}")
        return self.metadata.layer_map[layer]

    def get(self, name: str, *, device: torch.device | str | None = None) -> torch.Tensor:
        key = self.key_for(name)
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                cov = f.get_tensor(key)
        except Exception as exc:
            raise CovarianceFileError(f"{self.path}: cannot read covariance {key!r} ({exc})") from exc
        return cov if device is None else cov.to(device)

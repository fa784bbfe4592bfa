"""The fit check of every face: do these covariances belong to this model?

Layers present, input sizes, the weights' fingerprint (:func:`check_covariance_file`), and, for
``pave collect --check``, every matrix's values. :func:`fitted_source` is what the faces call: the
check, with the model named in the error.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .covariance import CovarianceFile, CovarianceFileError
from .sources import FINGERPRINT_POLICIES, CovarianceSource

log = logging.getLogger("pave_plugins")

#: how the fingerprint error says to accept a mismatch, in the API's words; a face passes its own
API_MISMATCH_HINT = "pass on_fingerprint_mismatch='warn' to use it anyway"


def fitted_source(
    cov: CovarianceSource | str | os.PathLike,
    model: nn.Module | Mapping[str, Any] | str | os.PathLike,
    *,
    label: str,
    on_fingerprint_mismatch: str,
    mismatch_hint: str = API_MISMATCH_HINT,
) -> CovarianceSource:
    """``cov`` opened and checked against ``model`` (:func:`check_covariance_file`); a
    :class:`CovarianceFileError` names the model (``label``) and says how this face accepts a
    fingerprint mismatch (``mismatch_hint``)."""
    try:
        return check_covariance_file(cov, model, on_fingerprint_mismatch=on_fingerprint_mismatch)
    except CovarianceFileError as exc:
        raise CovarianceFileError(f"{str(exc).replace(API_MISMATCH_HINT, mismatch_hint)} (model {label})") from exc


def _weight_in_features(
    model: nn.Module | Mapping[str, Any] | str | os.PathLike,
) -> tuple[dict[str, Any], Callable[[], str]]:
    """``{layer name: input features}`` of a model (module, state dict or checkpoint dir), and a
    function computing its fingerprint (only when a file carries one to compare)."""
    from .fingerprint import model_fingerprint
    from .layers import hookable_layers

    fingerprint = functools.cache(lambda: model_fingerprint(model))
    if isinstance(model, nn.Module):
        return {h.name: h.in_features for h in hookable_layers(model)}, fingerprint
    shapes: dict[str, tuple[int, ...]] = {}
    if isinstance(model, Mapping):
        shapes = {k: tuple(v.shape) for k, v in model.items() if torch.is_tensor(v)}
    else:
        from safetensors import safe_open

        from .checkpoints import weight_files

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
            raise CovarianceFileError(f"{msg}; {API_MISMATCH_HINT}")
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
    from .covariance import resolve_layer_name

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

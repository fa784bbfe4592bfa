"""Covariance access for the mergekit ``pave`` method: lazy files, model check, bounded cache.

mergekit streams a merge tensor by tensor; so does this: a covariance is read from its file only
when the tensor that needs it is merged. Layers that read the same input (q/k/v, gate/up) share
one covariance in the file; the damping check (:func:`pave_plugins.core.prepare_covariance`, a
Cholesky factorisation) is then done once and the prepared matrix kept in a small per-file LRU
cache (mergekit processes a layer's tensors one after the other, so two entries suffice).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from typing import Hashable

import torch

from pave_plugins.core import PreparedCovariance, prepare_covariance
from pave_plugins.io.covariance import CovarianceFile, CovarianceFileError

logger = logging.getLogger("pave_plugins.mergekit")

PREPARED_PER_FILE = 2


def model_tensor_names(model: Hashable) -> list[str] | None:
    """Tensor names of a model that mergekit has already opened (``None`` if unknown)."""
    try:
        from mergekit.io.tasks import LoaderCache

        loader = LoaderCache().loaders.get(model)
        if loader is None:
            return None
        return list(loader.index.tensor_paths)
    except Exception:  # a different id type (mergekit's in-memory API) or a changed mergekit
        return None


def check_file_matches_model(cf: CovarianceFile, model: Hashable, names: list[str]) -> None:
    """Refuse a covariance file none of whose layers is a weight of ``model`` (another model's file)."""
    layers = {n[: -len(".weight")] for n in names if n.endswith(".weight")}
    if not layers or not cf.layers:
        return

    def present(layer: str) -> bool:
        if layer in layers:
            return True
        return any(m.endswith("." + layer) or layer.endswith("." + m) for m in layers)

    missing = [layer for layer in cf.layers if not present(layer)]
    if len(missing) == len(cf.layers):
        raise CovarianceFileError(
            f"covariance file {cf.path} does not fit model {model}: none of its {len(cf.layers)} layers "
            f"(e.g. {cf.layers[:3]}) is a weight of that model (e.g. {sorted(layers)[:3]}); "
            "was it collected for another model?"
        )
    if missing:
        logger.warning(
            "pave: %d layers of covariance file %s are not weights of model %s (e.g. %s)",
            len(missing),
            cf.path,
            model,
            missing[:3],
        )


class CovarianceStore:
    """Per-merge cache: open files (checked against their model) and prepared covariances."""

    def __init__(self, prepared_per_file: int = PREPARED_PER_FILE) -> None:
        self._lock = threading.RLock()
        self._files: dict[tuple[Hashable, str], CovarianceFile] = {}
        self._prepared: dict[str, OrderedDict] = {}
        self.prepared_per_file = prepared_per_file
        self.n_prepared = 0  # how many Cholesky checks were run (tests and logs)

    def clear(self) -> None:
        with self._lock:
            self._files.clear()
            self._prepared.clear()

    def file(self, model: Hashable, path: str, *, tensor_names: list[str] | None = None) -> CovarianceFile:
        """Open ``path`` once per (model, path) and check that it belongs to ``model``.

        ``tensor_names`` (the model's tensor names) default to those of mergekit's loader.
        """
        try:  # a file rewritten between two merges in one process is opened again
            st = os.stat(os.path.expanduser(path))
            key = (model, path, st.st_mtime_ns, st.st_size)
        except OSError:
            key = (model, path, None, None)
        with self._lock:
            cf = self._files.get(key)
            if cf is None:
                cf = CovarianceFile(os.path.expanduser(path))
                names = tensor_names if tensor_names is not None else model_tensor_names(model)
                if names is not None:
                    check_file_matches_model(cf, model, names)
                self._files[key] = cf
            return cf

    def prepared(
        self,
        cf: CovarianceFile,
        layer: str,
        *,
        device: torch.device,
        compute_dtype: torch.dtype,
    ) -> tuple[PreparedCovariance, str]:
        """The prepared covariance of ``layer`` (shared by the layers that read the same input)."""
        cov_key = cf.key_for(layer)
        path = f"{cf.path}@{id(cf)}"  # one cache per opened file object
        ck = (cov_key, str(device), str(compute_dtype))
        with self._lock:
            cache = self._prepared.setdefault(path, OrderedDict())
            hit = cache.get(ck)
            if hit is not None:
                cache.move_to_end(ck)
                return hit, cov_key
            cov = cf.get(layer, device=device)
            try:
                prepared = prepare_covariance(
                    cov, compute_dtype=compute_dtype, name=f"covariance {cov_key!r} (layer {layer!r}) in {cf.path}"
                )
            except ValueError as exc:
                raise CovarianceFileError(str(exc)) from exc
            del cov
            self.n_prepared += 1
            cache[ck] = prepared
            while len(cache) > self.prepared_per_file:
                cache.popitem(last=False)
            return prepared, cov_key

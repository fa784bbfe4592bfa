"""Covariance files of a mergekit ``pave`` merge: opened once per model, checked against it.

mergekit streams a merge tensor by tensor; so does this: a covariance is read from its file only
when the tensor that needs it is merged, and prepared (damping check) once per shared input by the
engine's :class:`~pave_plugins.io.sources.PreparedCache`. Every file goes through the same fit check
as in the other faces (:func:`pave_plugins.io.fit.fitted_source`) against the model folder
mergekit loads; a fingerprint mismatch is a warning by default here (the setting
``on_fingerprint_mismatch``: mergekit cannot say whether a folder is
the model a covariance was collected on or a LoRA-merged / re-wrapped copy of it).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Hashable, Optional, Sequence

from pave_plugins.io.covariance import CovarianceFile
from pave_plugins.io.fit import fitted_source
from pave_plugins.io.sources import PreparedCache

from .source_names import source_name

logger = logging.getLogger("pave_plugins.mergekit")


def check_covariance_path(path: Optional[str]) -> Optional[str]:
    """The per-model ``covariance`` parameter: a file that exists (or unset)."""
    if path is not None and not os.path.isfile(os.path.expanduser(path)):
        raise ValueError(f"covariance file not found: {path}")
    return path


def model_folder(model: Hashable) -> Path | None:
    """The local folder mergekit reads ``model``'s weights from (LoRA-merged copy included), if known."""
    try:
        from mergekit.io.tasks import LoaderCache

        loader = LoaderCache().loaders.get(model)
        path = Path(loader.index.base_path) if loader is not None else None
    except Exception:  # a different id type (mergekit's in-memory API) or a changed mergekit
        return None
    return path if path is not None and any(path.glob("*.safetensors")) else None


class StepSource:
    """A model's covariance file as a merge step reads it: a tensor is looked up under the name of
    the source tensor that feeds the step (:func:`.source_names.source_name`; mergekit's slices
    can feed output layer i from source layer j)."""

    def __init__(self, model: Hashable, source: CovarianceFile) -> None:
        self.model, self.source = model, source

    def _name(self, name: str) -> str:
        return source_name(self.model, name)

    origin = property(lambda self: self.source.origin)
    layers = property(lambda self: self.source.layers)
    fingerprint = property(lambda self: self.source.fingerprint)
    layer_info = property(lambda self: self.source.layer_info)
    counts = property(lambda self: self.source.counts)

    def key_sizes(self) -> dict[str, int]:
        return self.source.key_sizes()

    def resolve(self, name: str) -> str | None:
        return self.source.resolve(self._name(name))

    def __contains__(self, name: str) -> bool:
        return self.resolve(name) is not None

    def key_for(self, name: str) -> str:
        return self.source.key_for(self._name(name))

    def get(self, name: str, *, device=None):
        return self.source.get(self._name(name), device=device)


class CovarianceStore:
    """Per-merge state: open files (checked against their model) and the prepared-covariance cache."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._files: dict[tuple, StepSource] = {}
        self._ratios: dict[tuple, list[float]] = {}
        self.cache = PreparedCache()

    @property
    def n_prepared(self) -> int:
        return self.cache.n_prepared

    def clear(self) -> None:
        with self._lock:
            self._files.clear()
            self._ratios.clear()
            self.cache.clear()

    def file(self, model: Hashable, path: str, *, on_fingerprint_mismatch: str) -> StepSource:
        """Open ``path`` once per (model, path) and run the fit check against ``model``'s folder;
        the step's tensors are looked up under their source names (see :class:`StepSource`)."""
        try:  # a file rewritten between two merges in one process is opened again
            st = os.stat(os.path.expanduser(path))
            key = (model, path, st.st_mtime_ns, st.st_size)
        except OSError:
            key = (model, path, None, None)
        with self._lock:
            cf = self._files.get(key)
            if cf is None:
                cf = CovarianceFile(os.path.expanduser(path))
                folder = model_folder(model)
                if folder is not None:
                    fitted_source(cf, folder, label=str(model), on_fingerprint_mismatch=on_fingerprint_mismatch)
                cf = self._files[key] = StepSource(model, cf)
            return cf

    def model_ratios(self, settings: Any, base: Hashable, models: Sequence[Hashable],
                     sources: Sequence[StepSource | None]) -> list[float]:
        """``rank_granularity: model``: Algorithm 1 over every layer of the models' own folders, once
        per merge (a first pass before the first tensor is purified; see ``PaveEngine.rank_ratios``)."""
        key = (settings, base, tuple(models))
        with self._lock:
            if key not in self._ratios:
                self._ratios[key] = _first_pass_ratios(settings, base, models, sources)
            return self._ratios[key]


def _first_pass_ratios(settings: Any, base: Hashable, models: Sequence[Hashable],
                       sources: Sequence[StepSource | None]) -> list[float]:
    from pave_plugins.engine.step import PaveEngine
    from pave_plugins.io.checkpoints import CheckpointReader
    from pave_plugins.io.sources import lookup_key

    folders = [model_folder(m) for m in (base, *models)]
    for m, folder in zip((base, *models), folders):
        if folder is None:
            raise ValueError(f"pave: rank_granularity model reads every layer before the merge, but {m} has no "
                             "local safetensors folder mergekit knows of; use rank_granularity layer")
    readers = [CheckpointReader(f) for f in folders]  # type: ignore[arg-type]
    files = [s.source if s is not None else None for s in sources]
    engine = PaveEngine(settings, files, [str(m) for m in models], cache=PreparedCache())
    names = [n for n in readers[0].names() if any(lookup_key(f, n) for f in files if f is not None)]
    return engine.rank_ratios(names, lambda n: (readers[0].get(n), [r.get(n) for r in readers[1:]]),
                              progress="pave")

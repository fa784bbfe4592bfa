"""Covariance files of a mergekit ``pave`` merge: opened once per model, checked against it.

mergekit streams a merge tensor by tensor; so does this: a covariance is read from its file only
when the tensor that needs it is merged, and prepared (damping check) once per shared input by the
engine's :class:`~pave_plugins.io.sources.PreparedCache`. Every file goes through the same fit check
as in the other faces (:func:`pave_plugins.collect.check_covariance_file`) against the model folder
mergekit loads; a fingerprint mismatch is a warning here (mergekit cannot say whether a folder is
the model a covariance was collected on or a LoRA-merged / re-wrapped copy of it).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Hashable, Optional

from pave_plugins.collect.files import check_covariance_file
from pave_plugins.io.covariance import CovarianceFile, CovarianceFileError
from pave_plugins.io.sources import PreparedCache

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


class CovarianceStore:
    """Per-merge state: open files (checked against their model) and the prepared-covariance cache."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._files: dict[tuple, CovarianceFile] = {}
        self.cache = PreparedCache()

    @property
    def n_prepared(self) -> int:
        return self.cache.n_prepared

    def clear(self) -> None:
        with self._lock:
            self._files.clear()
            self.cache.clear()

    def file(self, model: Hashable, path: str) -> CovarianceFile:
        """Open ``path`` once per (model, path) and run the fit check against ``model``'s folder."""
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
                    try:
                        check_covariance_file(cf, folder, on_fingerprint_mismatch="warn")
                    except CovarianceFileError as exc:
                        raise CovarianceFileError(f"{exc} (model {model})") from exc
                self._files[key] = cf
            return cf

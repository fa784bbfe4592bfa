"""Guards for reading Hugging Face checkpoint folders: pickles refused unless asked, clear load errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# pickles that from_pretrained never reads as weights
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt")


class PickleCheckpointError(ValueError):
    """A folder holds only pickle weights (``pytorch_model.bin``) and the user did not opt in."""


def pickle_weights(folder: str | os.PathLike) -> list[Path]:
    """Pickle weight files of ``folder`` when it has no safetensors weights (else ``[]``)."""
    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return []
    return sorted(f for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES and f.name not in NOT_WEIGHTS)


def refuse_pickle(folder: str | os.PathLike, *, allow_pickle: bool = False, option: str = "--allow-pickle") -> bool:
    """Raise :class:`PickleCheckpointError` when ``folder`` would be loaded from a pickle.

    Returns whether the folder is a pickle checkpoint (allowed). A pickle can run code when it
    is unpickled: we never load one silently.
    """
    pickles = pickle_weights(folder)
    if pickles and not allow_pickle:
        raise PickleCheckpointError(
            f"{folder}: weights are a pickle checkpoint ({[p.name for p in pickles[:2]]}), which is not loaded "
            f"unless you pass {option}; better, re-save the model with save_pretrained(safe_serialization=True)"
        )
    return bool(pickles)


def load_pretrained(cls: Any, folder: str | os.PathLike, *, allow_pickle: bool = False, **kwargs: Any) -> Any:
    """``cls.from_pretrained(folder, **kwargs)`` with the pickle guard and an error naming the folder
    for a truncated or corrupt checkpoint."""
    is_pickle = refuse_pickle(folder, allow_pickle=allow_pickle)
    if is_pickle:
        kwargs.setdefault("use_safetensors", False)
    try:
        return cls.from_pretrained(str(folder), **kwargs)
    except Exception as exc:  # SafetensorError, OSError, RuntimeError (size mismatch), ...
        raise ValueError(f"{folder}: cannot load the model checkpoint (truncated or corrupt file?): {exc}") from exc

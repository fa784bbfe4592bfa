"""Guards for reading Hugging Face checkpoint folders: pickles refused unless asked, clear load errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# pickles that from_pretrained never reads as weights
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt")


class PickleCheckpointError(ValueError):
    """A folder holds only pickle weights (``pytorch_model.bin``) and the user did not opt in."""


# safetensors files a model folder can hold that are not its weights (an adapter, a Lambda file)
NOT_WEIGHT_SAFETENSORS = ("adapter_model.safetensors", "rethink_lambda.safetensors")


def _indexed(folder: Path, index_name: str) -> list[Path] | None:
    index = folder / index_name
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return sorted({folder / str(f) for f in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{index}: not a readable weight index ({exc})") from None


def weight_files(folder: str | os.PathLike) -> tuple[str, list[Path]]:
    """The files that hold a Hugging Face folder's weights, as ``from_pretrained`` picks them:
    ``("safetensors", files)`` (the index's shards, ``model.safetensors``, or else every visible
    ``*.safetensors`` but adapters and Lambda files), else ``("pickle", files)`` (the same for
    ``pytorch_model*.bin``; a Trainer checkpoint's ``optimizer.pt``, ``rng_state.pth``, ... are not
    weights), else ``("none", [])``."""
    folder = Path(folder)
    if not folder.is_dir():
        return "none", []
    shards = _indexed(folder, "model.safetensors.index.json")
    if shards is None:
        single = folder / "model.safetensors"
        shards = [single] if single.is_file() else sorted(
            f for f in folder.glob("*.safetensors") if not f.name.startswith(".") and f.name not in NOT_WEIGHT_SAFETENSORS)
    if shards:
        return "safetensors", shards
    pickles = _indexed(folder, "pytorch_model.bin.index.json")
    if pickles is None:
        single = folder / "pytorch_model.bin"
        pickles = [single] if single.is_file() else sorted(
            f for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES and f.name not in NOT_WEIGHTS
            and not f.name.startswith("."))
    return ("pickle", pickles) if pickles else ("none", [])


def pickle_weights(folder: str | os.PathLike) -> list[Path]:
    """Pickle weight files of ``folder`` when it has no safetensors weights (else ``[]``)."""
    kind, files = weight_files(folder)
    return files if kind == "pickle" else []


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


def check_model_config(folder: str | os.PathLike) -> None:
    """A model folder's ``config.json`` is a JSON object (else a ``ValueError`` naming the file, before
    a tokenizer or model loader reports it as something else)."""
    from .strict_json import read_object

    config = Path(folder) / "config.json"
    if config.is_file():
        read_object(config)


def load_pretrained(cls: Any, folder: str | os.PathLike, *, allow_pickle: bool = False, **kwargs: Any) -> Any:
    """``cls.from_pretrained(folder, **kwargs)`` with the pickle guard and an error naming the folder
    for a truncated or corrupt checkpoint."""
    check_model_config(folder)
    is_pickle = refuse_pickle(folder, allow_pickle=allow_pickle)
    if is_pickle:
        kwargs.setdefault("use_safetensors", False)
    try:
        return cls.from_pretrained(str(folder), **kwargs)
    except Exception as exc:  # SafetensorError, OSError, RuntimeError (size mismatch), ...
        raise ValueError(f"{folder}: cannot load the model checkpoint (truncated or corrupt file?): {exc}") from exc


class CheckpointReader:
    """Lazy reader of the safetensors weights of a Hugging Face folder.

    Pickle checkpoints (``pytorch_model.bin``, ``*.pt``) are refused unless ``allow_pickle``; they are
    then read eagerly with ``torch.load(weights_only=True)``.
    """

    def __init__(self, folder: Path, *, allow_pickle: bool = False):
        from safetensors import safe_open

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"model folder not found: {self.folder}")
        kind, files = weight_files(self.folder)
        self.where: dict[str, Path] = {}
        self.dtypes: dict[str, str] = {}
        self._open: dict[Path, object] = {}
        self._loaded: dict[str, object] | None = None
        if kind != "safetensors":
            pickles = files
            if pickles and allow_pickle:
                self._load_pickles(pickles)
                return
            hint = (
                f" (found {[f.name for f in pickles[:2]]}: pickle checkpoints are not loaded unless you pass "
                "--allow-pickle (allow_pickle=True); better, re-save with safe_serialization=True)"
                if pickles
                else ""
            )
            raise FileNotFoundError(f"{self.folder}: no .safetensors weights{hint}")
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: a weight file the folder's index names is missing")
            try:
                with safe_open(str(f), framework="pt") as st:
                    for k in st.keys():
                        self.where[k] = f
            except Exception as exc:  # SafetensorError, OSError: truncated or corrupt header
                raise ValueError(f"{f}: cannot read safetensors checkpoint (truncated or corrupt?): {exc}") from exc

    def _load_pickles(self, pickles: list[Path]) -> None:
        import torch

        self._loaded = {}
        for f in pickles:
            try:
                sd = torch.load(str(f), map_location="cpu", weights_only=True)
            except Exception as exc:
                raise ValueError(f"{f}: cannot read pickle checkpoint ({exc})") from exc
            if not isinstance(sd, dict):
                raise ValueError(f"{f}: pickle checkpoint does not hold a state dict")
            for k, v in sd.items():
                if torch.is_tensor(v):
                    self._loaded[k] = v
                    self.where[k] = f

    def names(self) -> list[str]:
        return list(self.where)

    def fit_target(self) -> Any:
        """What the fit check reads: the folder, or the loaded state dict of a pickle checkpoint."""
        return dict(self._loaded) if self._loaded is not None else self.folder

    def get(self, name: str):
        from safetensors import safe_open

        f = self.where.get(name)
        if f is None:
            raise KeyError(f"{self.folder}: has no tensor {name!r}")
        if self._loaded is not None:
            return self._loaded[name]
        try:
            if f not in self._open:
                self._open[f] = safe_open(str(f), framework="pt", device="cpu")
            return self._open[f].get_tensor(name)  # type: ignore[attr-defined]
        except Exception as exc:  # data section truncated after a valid header
            raise ValueError(f"{f}: cannot read tensor {name!r} (truncated or corrupt file?): {exc}") from exc


class ShardedWriter:
    """Write tensors as safetensors shards of at most ``max_shard_size`` bytes, named as Hugging Face
    does (``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` and an index)."""

    def __init__(self, folder: str | os.PathLike, *, max_shard_size: int = 5 * 10**9) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_size = max_shard_size
        self._shards: list[dict[str, torch.Tensor]] = []
        self._current: dict[str, torch.Tensor] = {}
        self._size = 0
        self.total_size = 0
        self._written: list[Path] = []
        self.weight_map: dict[str, str] = {}

    def save_tensor(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if self._current and self.max_shard_size > 0 and self._size + nbytes > self.max_shard_size:
            self._flush()
        self._current[name] = tensor
        self._size += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._current:
            return
        path = self.folder / f"model-{len(self._written) + 1}.safetensors"
        save_file(self._current, str(path), metadata={"format": "pt"})
        self.weight_map.update({k: path.name for k in self._current})
        self._written.append(path)
        self.total_size += self._size
        self._current, self._size = {}, 0

    def finalize(self) -> None:
        self._flush()
        n = len(self._written)
        names = {p.name: ("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
                 for i, p in enumerate(self._written)}
        for p in self._written:
            p.rename(self.folder / names[p.name])
        if n > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {k: names[v] for k, v in self.weight_map.items()}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")

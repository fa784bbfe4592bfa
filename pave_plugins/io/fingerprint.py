"""A cheap, deterministic fingerprint of a model's weights.

``sha256`` over the distinct ``(shape, sample)`` pairs of the floating-point tensors, where the
sample is up to 4 rows along the first dimension with 16 evenly spaced values in each row, rounded
to bfloat16 (names are left out so that tied weights, saved once but listed twice by a module, do
not change it; layer names and shapes are checked separately against the covariance file). It reads a few kilobytes per tensor, so a checkpoint directory is fingerprinted without
loading it (``safe_open`` row slices), and the same weights give the same fingerprint whether they
come from a module, a state dict or ``*.safetensors`` files, in float32 or bfloat16 (the values are
rounded to bfloat16 first; a float16 copy can differ).

Names are normalised like the covariance layer names: a PEFT model's ``base_model.model.`` prefix and
``.base_layer`` are stripped and adapter weights (``lora_*``) are skipped, i.e. a PEFT model is
fingerprinted by its *base* weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

_ROWS = 4
_COLS = 16
_SKIP_PARTS = ("lora_", "vera_", "modules_to_save", "original_module")


def _norm_name(name: str) -> str | None:
    if any(p in name for p in _SKIP_PARTS):
        return None
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    return name.replace(".base_layer", "")


def _linspace_idx(n: int, k: int) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _sample(shape: tuple[int, ...], get_row: Callable[[int], Tensor]) -> bytes:
    if len(shape) == 0:
        vals = get_row(0).reshape(-1)
    else:
        rows = _linspace_idx(int(shape[0]), _ROWS)
        parts = []
        for r in rows:
            row = get_row(r).reshape(-1)
            idx = torch.tensor(_linspace_idx(row.numel(), _COLS), dtype=torch.long)
            parts.append(row.index_select(0, idx) if row.numel() else row)
        vals = torch.cat(parts) if parts else torch.zeros(0)
    if vals.is_floating_point() or vals.is_complex():
        vals = vals.float().to(torch.bfloat16).float()
    else:
        vals = vals.to(torch.float64)
    return vals.to(torch.float64).numpy().tobytes()


def _digest(items: list[tuple[str, tuple[int, ...], Callable[[int], Tensor]]]) -> str:
    # name-free and deduplicated by content: a tied weight (lm_head = embed_tokens) counts once,
    # whether the state dict lists it under two names (a module) or one (a saved checkpoint)
    entries = {(tuple(shape), _sample(shape, get_row)) for _, shape, get_row in items}
    h = hashlib.sha256()
    for shape, data in sorted(entries):
        h.update(json.dumps(list(shape)).encode())
        h.update(data)
    return "sha256:" + h.hexdigest()[:32]


def _items_from_tensors(tensors: Mapping[str, Tensor]) -> list[tuple[str, tuple[int, ...], Callable[[int], Tensor]]]:
    items = []
    seen: set[str] = set()
    for name, t in tensors.items():
        n = _norm_name(name)
        if n is None or n in seen or not torch.is_tensor(t) or not t.is_floating_point():
            continue
        seen.add(n)
        t = t.detach()
        if t.device.type == "meta":
            raise ValueError(f"cannot fingerprint {name!r}: it is on the meta device")
        items.append((n, tuple(t.shape), (lambda r, t=t: (t if t.dim() == 0 else t[r]).cpu())))
    return items


def _items_from_dir(path: Path) -> list[tuple[str, tuple[int, ...], Callable[[int], Tensor]]]:
    from safetensors import safe_open

    from pave_plugins.io.checkpoints import weight_files

    kind, files = weight_files(path)
    if kind != "safetensors":
        bins = files
        if not bins:
            raise FileNotFoundError(f"{path}: no *.safetensors or pytorch_model*.bin weights to fingerprint")
        sd: dict[str, Tensor] = {}
        for b in bins:
            sd.update(torch.load(b, map_location="cpu", weights_only=True))
        return _items_from_tensors(sd)
    items = []
    seen: set[str] = set()
    for f in files:
        handle = safe_open(str(f), framework="pt", device="cpu")
        for name in handle.keys():
            n = _norm_name(name)
            if n is None or n in seen:
                continue
            seen.add(n)
            sl = handle.get_slice(name)
            if not str(sl.get_dtype()).upper().startswith(("F", "BF")):
                continue  # integer / bool buffers (position ids, masks) are not weights
            shape = tuple(sl.get_shape())

            def get_row(r: int, sl=sl, shape=shape) -> Tensor:
                return sl[:] if len(shape) == 0 else sl[r : r + 1]

            items.append((n, shape, get_row))
    return items


def model_fingerprint(source: nn.Module | Mapping[str, Tensor] | str | os.PathLike) -> str:
    """Fingerprint of a module, a state dict, or a checkpoint directory (``*.safetensors``).

    Tied weights (one tensor under two names) count under each name they have in the state dict,
    as in a saved checkpoint.
    """
    if isinstance(source, nn.Module):
        return _digest(_items_from_tensors(source.state_dict()))
    if isinstance(source, Mapping):
        return _digest(_items_from_tensors(source))
    path = Path(source)
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _digest(_items_from_tensors(load_file(str(path))))
    if not path.is_dir():
        raise FileNotFoundError(f"cannot fingerprint {path}: not a model directory or .safetensors file")
    return _digest(_items_from_dir(path))

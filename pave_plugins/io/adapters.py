"""PEFT adapter folders: the one place their ``adapter_config.json`` is read and checked.

``pave collect --adapter`` (any PEFT adapter, loaded with PEFT) and ``pave rethink --lora`` (LoRA
adapters, whose factors it reads itself) both open adapters here, so a malformed config, a LoRA
rank that is not a positive integer, or an adapter made for another model is one error naming the
folder, the file or the module at fault.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .strict_json import read_object

CONFIG_NAME = "adapter_config.json"


class AdapterError(ValueError):
    """An adapter folder that cannot be used (malformed config, bad rank, another model's shapes)."""


def read_adapter_config(path: str | os.PathLike, *, lora_only: bool = False) -> dict[str, Any]:
    """The checked ``adapter_config.json`` of a PEFT adapter folder (LoRA: ``r`` a positive integer,
    ``lora_alpha`` a finite number); ``lora_only`` refuses other adapter types."""
    path = Path(path)
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path} is not a PEFT adapter folder (it has no {CONFIG_NAME})")
    try:
        cfg = read_object(cfg_path)
    except ValueError as exc:
        raise AdapterError(str(exc)) from None
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if lora_only and kind != "LORA":
        raise AdapterError(f"{path}: only LoRA adapters are supported, got peft_type={cfg.get('peft_type')}")
    if kind == "LORA":
        r = cfg.get("r")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise AdapterError(f"{cfg_path}: r (the LoRA rank) must be a positive integer, got {r!r}")
        alpha = cfg.get("lora_alpha", r)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise AdapterError(f"{cfg_path}: lora_alpha must be a finite number, got {alpha!r}")
    return cfg


def check_factor_shapes(path: str | os.PathLike, module: str, delta_shape: tuple[int, ...],
                        weight_shape: tuple[int, ...], model: str | os.PathLike) -> None:
    """A LoRA update ``B A`` must have the shape of the weight it changes: else the adapter was
    trained on another model (another width)."""
    if tuple(delta_shape) != tuple(weight_shape):
        raise AdapterError(f"{path}: the update of {module} is {tuple(delta_shape)}, the weight in {model} is "
                           f"{tuple(weight_shape)}: an adapter of another model (another width?)")

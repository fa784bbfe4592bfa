"""Which layers of a model have an input covariance, and under which name.

A covariance is kept per linear layer (``nn.Linear``, or GPT-2's ``Conv1D``) under its name in the
merged (plain) model: a PEFT model's ``base_model.model.`` prefix and ``.base_layer`` are dropped
and adapter internals are never listed. The collector hooks these layers; the fit check compares a
covariance file with them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

LayerFilter = Callable[[str, nn.Module], bool] | str | None

# PEFT adapter internals: never hooked (they do not exist in the merged model)
_PEFT_INTERNAL = {
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
    "lora_dropout",
    "original_module",
    "lora_E",
    "vera_A",
    "vera_B",
}





@dataclass
class HookedLayer:
    raw_name: str  # name in model.named_modules()
    name: str  # name in the merged (plain) model
    module: nn.Module
    kind: str  # "Linear" or "Conv1D"
    in_features: int


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def hookable_layers(model: nn.Module, layer_filter: LayerFilter = None) -> list[HookedLayer]:
    """Every linear layer whose input covariance PAVE can use, with its merged-model name.

    ``layer_filter``: a regular expression searched in the (merged) layer name, or a callable
    ``(name, module) -> bool``.
    """
    peft = is_peft_model(model)
    modules = dict(model.named_modules())
    tuner_layers = {n for n, m in modules.items() if hasattr(m, "base_layer") and hasattr(m, "active_adapters")}
    wrappers = {n for n, m in modules.items() if hasattr(m, "original_module") and hasattr(m, "modules_to_save")}
    if isinstance(layer_filter, str):
        pattern = re.compile(layer_filter)

        def keep(name: str, module: nn.Module) -> bool:
            return pattern.search(name) is not None
    else:
        keep = layer_filter  # type: ignore[assignment]

    out: list[HookedLayer] = []
    for raw, m in modules.items():
        if isinstance(m, nn.Linear):
            kind, d = "Linear", m.in_features
        elif _is_conv1d(m):
            kind, d = "Conv1D", int(m.weight.shape[0])
        else:
            continue
        parts = raw.split(".")
        if any(p in _PEFT_INTERNAL for p in parts):
            continue
        name = raw
        if peft and name.startswith("base_model.model."):
            name = name[len("base_model.model.") :]
        # "<tuner layer>.base_layer" -> "<tuner layer>"; "<wrapper>.modules_to_save.<adapter>" -> "<wrapper>"
        for t in sorted(tuner_layers, key=len, reverse=True):
            if raw == t + ".base_layer":
                name = _strip_peft(t, peft)
                break
        for w in wrappers:
            if raw.startswith(w + ".modules_to_save."):
                # "<wrapper>.modules_to_save.<adapter>[.<child>]" -> "<wrapper>[.<child>]"
                rest = raw[len(w) + len(".modules_to_save.") :].split(".", 1)
                name = _strip_peft(w, peft) + ("." + rest[1] if len(rest) > 1 else "")
        if keep is not None and not keep(name, m):
            continue
        out.append(HookedLayer(raw, name, m, kind, int(d)))
    names = [h.name for h in out]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"two hooked layers map to the same merged-model name: {dup[:4]}")
    return out


def _strip_peft(name: str, peft: bool) -> str:
    if peft and name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    return name.replace(".base_layer", "")



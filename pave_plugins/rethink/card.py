"""The model card of a ``pave rethink`` output: the whole pipeline (the input merge, or the weighted
sum of LoRA adapters, then LoRA-DV) under the output's own title, with the Hub metadata block of
:mod:`pave_plugins.cards` (the input merge's Hub models and tags, plus ``lora-dv``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pave_plugins import cards, papers

from .output import LAMBDA_FILE

RECIPE_FILE = "rethink.json"


def _input_card(merged: str | None) -> tuple[dict, str]:
    """``(metadata, body)`` of the input merge's card (empty when it has none)."""
    path = Path(merged) / "README.md" if merged else None
    if path is None or not path.is_file():
        return {}, ""
    return cards.split_card(path.read_text(encoding="utf-8"))


def _listed(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else [v for v in (value or []) if isinstance(v, str)]


def rethought_card(recipe: Mapping[str, Any], out: str) -> str:
    """The card of a rethought model (``recipe``: what ``pave rethink`` records in ``rethink.json``)."""
    meta, body = _input_card(recipe.get("merged"))
    lora = recipe.get("lora") or {}
    bases = [b for b in _listed(meta.get("base_model")) if cards.hub_id(b)]
    bases += [b for b in cards.hub_ids([recipe["base"], *lora.values()]) if b not in bases]
    tags = [t for t in _listed(meta.get("tags")) if t != "lora-dv"] or ["merge"]
    paths = [recipe["base"], recipe.get("merged"), *lora.values(), *recipe["calibration"].values(),
             *(recipe.get("heads") or {}).values()]
    if recipe.get("merged"):
        source = f"the merged model `{cards.folder_name(recipe['merged'])}`"
        stage = cards.redact(cards.demote(body), paths) if body else "Its folder has no model card."
    else:
        source = f"the weighted sum of {len(lora)} LoRA adapters"
        stage = "\n".join(f"- `{cards.folder_name(p)}` (task {t}), weight {w}"
                          for (t, p), w in zip(lora.items(), recipe["lora_weights"]))
    lines = [
        cards.metadata(bases, [*tags, "lora-dv"]) + f"# {cards.folder_name(str(out))}", "",
        f"This model is {source} on the base `{cards.folder_name(recipe['base'])}`, then LoRA-DV spectral "
        "rethinking by `pave rethink` (pave_plugins). Pipeline: input merge -> LoRA-DV.", "",
        "## Stage 1: the input merge", "", stage, "",
        stage_two(recipe, paths),
    ]
    return "\n".join(lines)


def _samples_text(samples: Mapping[str, int] | int | None) -> str:
    if not isinstance(samples, Mapping):
        return f"{samples} samples per task"
    counts = set(samples.values())
    if len(counts) == 1:
        return f"{counts.pop()} samples per task"
    return "samples per task: " + ", ".join(f"{t} {n}" for t, n in samples.items())


def stage_two(recipe: Mapping[str, Any], paths=()) -> str:
    """The ``## Stage 2: LoRA-DV spectral rethinking`` section."""
    losses = recipe.get("losses") or []
    loss_line = (", ".join(f"iteration {i + 1}: {v[0]:.4g} -> {v[-1]:.4g}" for i, v in enumerate(losses) if v)
                 or "no training (epochs 0)")
    calib = ", ".join(f"{t}: `{cards.folder_name(str(p))}`" for t, p in recipe["calibration"].items())
    kind = "cross-entropy" if recipe["loss"] == "ce" else "Shannon entropy, eq. 14"
    lines = [
        "## Stage 2: LoRA-DV spectral rethinking", "",
        "For every 2-D layer, the difference vector to the base was decomposed by SVD, U and V frozen,",
        "and an anisotropic scale Lambda of the singular values (eq. 8) learned on a small calibration",
        "set for all layers jointly (eq. 13), repeated with a re-decomposition each iteration.", "",
        cards.paper_line(papers.LORA_DV),
        f"- task type: {recipe['task_type']}; loss: {recipe['loss']} ({kind})",
        f"- iterations T={recipe['iterations']}, epochs {recipe['epochs']}, Adam lr {recipe['lr']}, "
        f"mode {recipe['mode']}, top_k {recipe['top_k']}, seed {recipe['seed']}",
        f"- calibration: {calib} ({_samples_text(recipe['samples_per_task'])})",
        f"- layers rethought: {recipe['layers']} ({recipe['low_rank_layers']} via the LoRA low-rank fast path), "
        f"changed: {recipe['changed_layers']}",
        f"- calibration loss per iteration: {loss_line}",
        f"- learned Lambda per layer: `{LAMBDA_FILE}`; full recipe: `{RECIPE_FILE}`", "",
        cards.PATHS_NOTE, "",
    ]
    return cards.redact("\n".join(lines), paths)

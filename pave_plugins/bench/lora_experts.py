"""LoRA experts and mergekit merges for the benchmark harness.

* **LoRA experts** (PEFT): the same tasks trained as LoRA adapters on the frozen base encoder
  (frozen zero-shot heads, as for the full fine-tunes). Each adapter is saved with PEFT's
  ``save_pretrained`` (cached), and merged into a dense expert by PEFT's ``merge_and_unload`` after
  reloading it from disk, so the merges see exactly what a user's adapter folder gives.
* **mergekit**: the encoder and its experts are written as Hugging Face
  ``BertForSequenceClassification`` folders (mergekit 0.1.5's plain ``bert`` architecture fails in
  its planner for ``BertModel`` checkpoints; the classifier is a fixed, shared dummy and is not
  used: evaluation reads the encoder only) and merged by mergekit's own ``run_merge`` -- what
  ``mergekit-yaml`` runs -- with stock ``ties`` or this package's ``pave``; LoRA experts go through
  mergekit's ``base+adapter`` syntax (mergekit merges the adapter with PEFT itself).
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)
#: the writer named in the ownership record of a cache entry
CACHE_WHO = "pave bench cache"

#: LoRA targets: every linear layer of the encoder blocks (not the unused pooler)
LORA_TARGETS = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"


def seqcls_wrapper(base: nn.Module) -> nn.Module:
    """``BertForSequenceClassification`` (or the ``AutoModelForSequenceClassification`` of the
    base's type) whose encoder holds the base weights; its 2-way classifier is seeded (identical in
    every folder written from it) and never used by the benchmark."""
    from transformers import AutoModelForSequenceClassification

    cfg = copy.deepcopy(base.config)
    cfg.num_labels = 2
    cfg.architectures = None
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        wrapper = AutoModelForSequenceClassification.from_config(cfg)
    finally:
        torch.random.set_rng_state(state)
    encoder = getattr(wrapper, wrapper.base_model_prefix)
    encoder.load_state_dict(base.state_dict(), strict=True)
    return wrapper.eval()


def encoder_of(model: nn.Module) -> nn.Module:
    """The encoder inside a sequence-classification wrapper, or inside a ``PeftModel`` of one."""
    if hasattr(model, "get_base_model"):  # PeftModel -> the wrapped transformers model
        model = model.get_base_model()
    return getattr(model, model.base_model_prefix)


def save_hf_folder(wrapper_template: nn.Module, encoder_sd: dict[str, Tensor], folder: Path) -> Path:
    """Write ``encoder_sd`` inside the wrapper as a Hugging Face folder, atomically; reused if present."""
    from pave_plugins.io.output import output_folder

    if (folder / "config.json").is_file():
        return folder
    wrapper = copy.deepcopy(wrapper_template)
    encoder_of(wrapper).load_state_dict(encoder_sd, strict=True)
    with output_folder(folder, who=CACHE_WHO, overwrite=True, flag="cache entry") as tmp:
        wrapper.save_pretrained(str(tmp), safe_serialization=True)
    return folder


# --------------------------------------------------------------------------- LoRA experts


def finetune_lora(base: nn.Module, tok, task, head: Tensor, cfg, seed: int) -> Path:
    """Train a LoRA expert (PEFT, rank ``cfg.lora_rank``, alpha = 2 * rank) of ``task`` on the frozen
    base; returns the cached adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
    Training is :func:`~pave_plugins.bench.training.train_steps` (the same batches,
    loss and optimiser as the full fine-tunes, learning rate ``cfg.lora_lr``)."""
    from peft import LoraConfig, get_peft_model

    from pave_plugins.bench.training import finetune_key, train_steps
    from pave_plugins.io.output import output_folder

    key = finetune_key(cfg, task, seed, kind=f"lora-r{cfg.lora_rank}-lr{cfg.lora_lr}")
    folder = Path(cfg.cache_dir) / "lora" / f"{task.name}-s{seed}-{key}"
    if (folder / "adapter_config.json").is_file():
        log.info("LoRA expert of %s (seed %d) from cache %s", task.name, seed, folder)
        return folder
    torch.manual_seed(seed)
    model = get_peft_model(seqcls_wrapper(base).to(cfg.device),
                           LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0,
                                      target_modules=LORA_TARGETS, bias="none"))
    params = [p for p in model.parameters() if p.requires_grad]
    seconds = train_steps(encoder_of(model), params, tok, task, head, cfg, seed, cfg.lora_lr)
    with output_folder(folder, who=CACHE_WHO, overwrite=True, flag="cache entry") as tmp:
        model.save_pretrained(str(tmp))
    log.info("trained LoRA expert of %s (seed %d) in %.1f s -> %s", task.name, seed, seconds, folder)
    return folder


def lora_dense_state_dict(base: nn.Module, adapter: Path) -> dict[str, Tensor]:
    """The encoder state dict of ``base`` with the adapter merged (PEFT ``merge_and_unload``)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(seqcls_wrapper(base), str(adapter), is_trainable=False).merge_and_unload()
    return {k: v.detach().contiguous().clone() for k, v in encoder_of(model).state_dict().items()}


# --------------------------------------------------------------------------- mergekit


def run_mergekit(recipe: dict[str, Any], work: Path, prefix: str = "bert.", device: str = "cpu") -> dict[str, Tensor]:
    """Merge with mergekit's ``run_merge`` (what ``mergekit-yaml`` runs; ``device`` as its
    ``--device``, e.g. ``cuda`` for ``--cuda``); returns the merged encoder's state dict (``prefix``,
    the wrapper's encoder prefix, removed)."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    from pave_plugins._mergekit_bootstrap import load_plugins

    load_plugins()  # pave and tsv from the entry points, if the start-up hook has not (PAVE_PLUGINS_DISABLE: none)

    text = yaml.safe_dump(recipe, sort_keys=False)
    out = Path(tempfile.mkdtemp(prefix="merge-", dir=work))
    try:
        run_merge(MergeConfiguration.model_validate(recipe), str(out),
                  options=MergeOptions(copy_tokenizer=False, quiet=True, lora_merge_cache=str(work / "lora_merged"),
                                       device=str(device)),
                  config_source=text)
        sd: dict[str, Tensor] = {}
        for f in sorted(out.glob("*.safetensors")):
            sd.update(load_file(str(f)))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def ties_recipe(base: str, models: Sequence[str], lam: float, density: float) -> dict[str, Any]:
    """Stock mergekit TIES with FusionBench's conventions: summed (not averaged) elected entries."""
    return {"merge_method": "ties", "base_model": base,
            "models": [{"model": m, "parameters": {"weight": 1.0, "density": density}} for m in models],
            "parameters": {"normalize": False, "lambda": lam}, "dtype": "float32"}


def pave_recipe(base: str, models: Sequence[str], covariances: Sequence[str], lam: float, density: float,
                rho: float, target: str, allocation: str) -> dict[str, Any]:
    """``merge_method: pave`` with mergekit's TIES inside (same TIES settings as :func:`ties_recipe`)."""
    return {"merge_method": "pave", "base_model": base,
            "models": [{"model": m, "parameters": {"weight": 1.0, "density": density, "covariance": c}}
                       for m, c in zip(models, covariances)],
            "parameters": {"inner": "ties", "rho": rho, "rank_allocation": allocation, "target": target,
                           "normalize": False, "lambda": lam}, "dtype": "float32"}


def regmean_recipe(base: str, models: Sequence[str], covariances: Sequence[str], ratio: float) -> dict[str, Any]:
    """``merge_method: regmean`` on the same covariance files (summed Grams, the paper's weighting)."""
    return {"merge_method": "regmean", "base_model": base,
            "models": [{"model": m, "parameters": {"covariance": c}} for m, c in zip(models, covariances)],
            "parameters": {"reduce_non_diagonal_ratio": ratio, "gram_weighting": "sum"}, "dtype": "float32"}

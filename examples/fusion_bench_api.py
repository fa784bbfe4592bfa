"""PAVE and TSV-M through FusionBench's Python API, on a model pool built in code (no downloads).

Run: python examples/fusion_bench_api.py

A tiny random Llama base and two "fine-tunes" (the base plus small random task vectors); the
covariances of each fine-tune's linear-layer inputs are collected with
``pave_plugins.collect`` on random token batches and saved as covariance files; then ``PAVEAlgorithm`` (inner method: FusionBench's
own task_arithmetic) and ``TSVMerging`` run on a ``BaseModelPool`` exactly as ``fusion_bench`` would
run them, and the rank report is printed.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from fusion_bench import BaseModelPool
from transformers import LlamaConfig, LlamaForCausalLM

from pave_plugins.collect import collect_covariances
from pave_plugins.fusion_bench import PAVEAlgorithm, TSVMerging


def build_models(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    base = LlamaForCausalLM(config).eval()
    fine_tuned = {}
    for name in ("task_a", "task_b"):
        model = copy.deepcopy(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        fine_tuned[name] = model
    return base, fine_tuned


def main(workdir: str | None = None) -> dict:
    """Run the example; covariance files go to ``workdir`` (default: a temporary folder, removed)."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="pave-fb-example-") as tmp:
            return run(Path(tmp))
    return run(Path(workdir))


def run(workdir: Path) -> dict:
    base, fine_tuned = build_models()
    # PAVE feeds task k's data to fine-tuned model k; here random tokens stand in for the data.
    # The algorithm's parameters must be YAML-serialisable (FusionBench records its config),
    # so covariances are passed as files, as `pave collect` writes them.
    covariances = {}
    for name, model in fine_tuned.items():
        batches = [{"input_ids": torch.randint(0, 64, (8, 16))} for _ in range(4)]
        cov_set = collect_covariances(model, batches, progress=False)
        covariances[name] = str(cov_set.save(workdir / f"{name}.safetensors"))
    pool = BaseModelPool({"_pretrained_": base, **fine_tuned})
    pave = PAVEAlgorithm(inner={"name": "task_arithmetic", "scaling_factor": 0.5}, rho=15 / 16, covariances=covariances)
    merged = pave.run(pool)
    report = pave.last_report
    print("PAVE + task arithmetic: per-model preserved rank ratio rho_i")
    for name, ratio in report["model_ratios"].items():
        print(f"  {name}: rho_i = {ratio:.4f}")
    tsv = TSVMerging(alpha=1.0).run(BaseModelPool({"_pretrained_": copy.deepcopy(base), **fine_tuned}))
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        for label, model in (("PAVE+TA", merged), ("TSV-M", tsv)):
            print(f"{label}: logits of a random batch, mean |x| = {model(input_ids=ids).logits.abs().mean():.4f}")
    return {"pave": merged, "tsv": tsv, "report": report}


if __name__ == "__main__":
    main()

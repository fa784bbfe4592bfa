"""The benchmark harness's LoRA experts and mergekit paths (``pave bench --methods lora_experts mergekit``).

A tiny random BERT on two tasks of the committed snapshot (see test_bench_smoke.py). Checks against
independent computations: the dense LoRA expert is ``W + (alpha / r) B A`` read from the adapter
file; mergekit's ``ties`` recipe as the harness writes it is TIES with FusionBench's conventions
(per-tensor top-``density`` trim, sign election by the sum, disjoint *sum*, times lambda),
recomputed by brute force here.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from bench_helpers import DATA, TASKS, tiny_bert_folder


def _ties_reference(base: torch.Tensor, fts: list[torch.Tensor], density: float, lam: float) -> torch.Tensor:
    trimmed = []
    for ft in fts:
        tv = (ft - base).double().flatten()
        k = int(density * tv.numel())
        keep = torch.zeros_like(tv, dtype=torch.bool)
        keep[tv.abs().argsort(descending=True)[:k]] = True
        trimmed.append(torch.where(keep, tv, torch.zeros_like(tv)))
    stack = torch.stack(trimmed)
    sign = torch.sign(stack.sum(0))
    agree = torch.sign(stack) == sign
    merged = (stack * agree).sum(0)
    return (base.double().flatten() + lam * merged).reshape(base.shape)


def test_bench_lora_experts_and_mergekit(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from pave_plugins.bench import lora_experts as hosts
    from pave_plugins.bench.harness import BenchConfig, load_base, run

    cfg = BenchConfig(data_dir=str(DATA), tasks=TASKS, model_path=tiny_bert_folder(tmp_path / "model"),
                      out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), seeds=[0], steps=40,
                      lr=2e-3, lora_lr=1e-2, lora_rank=4, max_length=32, cov_examples=64, val_per_class=10,
                      test_per_class=40, methods=["lora_experts_individual", "lora_experts_ties", "mergekit"],
                      ties_grid=[0.6, 1.0], rho_grid=[0.9375], pave_targets=["delta"], rethink_iterations=1,
                      rethink_epochs=2)
    run(cfg)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    methods = saved["per_seed"][0]["methods"]
    assert set(methods) == {"zero_shot", "individual", "lora_experts_individual", "lora_experts_ties",
                            "mergekit_ties", "mergekit_pave_delta_ties", "mergekit_lora_ties", "mergekit_regmean"}
    # the LoRA experts learned their tasks (frozen base, frozen zero-shot heads)
    assert methods["lora_experts_individual"]["test_avg"] > methods["zero_shot"]["test_avg"] + 5.0, methods
    assert methods["mergekit_ties"]["hp"]["lambda"] in (0.6, 1.0)
    assert methods["mergekit_pave_delta_ties"]["recipe"]["merge_method"] == "pave"
    assert methods["mergekit_lora_ties"]["recipe"]["models"][0]["model"].count("+") == 1

    # dense LoRA expert == W + (alpha / r) * B @ A, from the adapter file itself
    _, base = load_base(cfg.model_path)
    adapters = sorted((tmp_path / "cache" / "lora").iterdir())
    assert len(adapters) == len(TASKS)
    dense = hosts.lora_dense_state_dict(base, adapters[0])
    factors = load_file(str(adapters[0] / "adapter_model.safetensors"))
    conf = json.loads((adapters[0] / "adapter_config.json").read_text())
    scale = conf["lora_alpha"] / conf["r"]
    name = "encoder.layer.1.intermediate.dense"
    a = factors[f"base_model.model.bert.{name}.lora_A.weight"]
    b = factors[f"base_model.model.bert.{name}.lora_B.weight"]
    expect = base.state_dict()[f"{name}.weight"] + scale * b @ a
    torch.testing.assert_close(dense[f"{name}.weight"], expect, rtol=1e-5, atol=1e-6)
    assert (b @ a).abs().max() > 0  # the adapter was trained

    # mergekit `ties` with the harness's recipe == brute-force TIES (sum convention)
    work = next((tmp_path / "cache" / "mergekit").iterdir())
    folders = [str(work / t) for t in TASKS]
    merged = hosts.run_mergekit(hosts.ties_recipe(str(work / "base"), folders, 0.8, 0.25), work)
    key = "encoder.layer.0.attention.self.query.weight"
    fts = [load_file(str(next((work / t).glob("*.safetensors"))))[f"bert.{key}"] for t in TASKS]
    ref = _ties_reference(base.state_dict()[key], fts, 0.25, 0.8)
    torch.testing.assert_close(merged[key].double(), ref, rtol=1e-5, atol=1e-6)

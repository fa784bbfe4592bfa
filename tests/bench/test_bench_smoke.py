"""CI-sized smoke run of the real benchmark harness (``pave bench``).

Two tasks of the committed snapshot (benchmarks/real/data, no apt needed), a tiny random BERT with
a word-level vocabulary built from the data (no hub, no model package), a few fine-tuning steps.
Asserts that the harness runs end to end through the host code paths (FusionBench TA, our PAVE
algorithm) and that fine-tuning beats the zero-shot head.
"""

from __future__ import annotations

import json
from collections import Counter

from bench_helpers import DATA, TASKS, tiny_bert_folder





def test_bench_smoke_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from pave_plugins.bench.harness import BenchConfig, load_task, run

    for t in TASKS:  # the committed snapshot is well formed
        task = load_task(DATA / t)
        counts = Counter(lab for _, lab in task.splits["test"])
        assert len(set(counts.values())) == 1, f"{t}: test split not balanced"
        assert not ({x for x, _ in task.splits["train"]} & {x for x, _ in task.splits["test"]}), f"{t}: leak"

    cfg = BenchConfig(data_dir=str(DATA), tasks=TASKS, model_path=tiny_bert_folder(tmp_path / "model"),
                      out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), seeds=[0], steps=40,
                      lr=2e-3, max_length=32, cov_examples=64, val_per_class=10, test_per_class=40,
                      methods=["ta", "pave_delta_spectral", "loradv_ce_ta"], ta_grid=[0.5, 1.0], rho_grid=[0.9375],
                      pave_targets=["delta"], pave_allocations=["spectral"], pave_bases=["ta"],
                      extend_grids=0)
    result = run(cfg)

    out = tmp_path / "out"
    for f in ("results.json", "results.md", "results.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    saved = json.loads((out / "results.json").read_text())
    summary = saved["summary"]
    assert set(summary) == {"zero_shot", "individual", "ta", "pave_delta_spectral_ta", "loradv_ce_ta"}
    # LoRA-DV ran through pave_plugins.core.rethink (T=3 iterations of 10 epochs) on the TA merge
    lora = saved["per_seed"][0]["methods"]["loradv_ce_ta"]
    assert len(lora["rethink_losses"]) == 3 and lora["rethink_layers"] > 0
    assert summary["individual"]["avg"] > summary["zero_shot"]["avg"] + 5.0, summary
    # hyper-parameters were chosen from the validation grid; the PAVE final went through pave/pave
    seed0 = saved["per_seed"][0]["methods"]
    assert seed0["ta"]["hp"]["lambda"] in (0.5, 1.0)
    assert seed0["pave_delta_spectral_ta"]["pave"]["final_path"] == "pave_plugins.fusion_bench.PAVEAlgorithm"
    assert 0.0 <= seed0["pave_delta_spectral_ta"]["pave"]["mean_rel_change"] < 1.0
    # normalised accuracy is merged / individual per task, averaged
    ind, ta = seed0["individual"]["test"], seed0["ta"]["test"]
    expect = 100.0 * sum(ta[t] / ind[t] for t in TASKS) / len(TASKS)
    assert abs(summary["ta"]["norm"] - expect) < 1e-9
    # fine-tunes are cached: a second run reuses them (same files, no retraining)
    cached = sorted((tmp_path / "cache" / "finetunes").glob("*.safetensors"))
    assert len(cached) == len(TASKS)
    assert result["summary"]["individual"]["avg"] == summary["individual"]["avg"]


def test_bench_regmean_ours_equals_fusionbench_and_runs_inside_pave(tmp_path, monkeypatch):
    """Our RegMean (covariance files, float64 Cholesky; through FusionBench and through stock mergekit)
    and FusionBench's (the same Gram matrices, float32 inverse) are one merge: on the test examples
    they predict alike (at most one example per task may flip on float32 round-off); PAVE + our
    RegMean runs through FusionBench ``pave/pave``."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from pave_plugins.bench.harness import BenchConfig, run

    cfg = BenchConfig(data_dir=str(DATA), tasks=TASKS, model_path=tiny_bert_folder(tmp_path / "model"),
                      out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), seeds=[0], steps=20,
                      lr=2e-3, max_length=32, cov_examples=64, val_per_class=10, test_per_class=40,
                      methods=["regmean", "regmean_ours", "pave_delta_spectral", "mergekit_regmean"], regmean_grid=[0.9],
                      rho_grid=[0.9375], pave_targets=["delta"], pave_allocations=["spectral"],
                      pave_bases=["regmean_ours"], extend_grids=0)
    seed0 = run(cfg)["per_seed"][0]["methods"]
    theirs, ours = seed0["regmean"]["test_correct"], seed0["regmean_ours"]["test_correct"]
    mergekit = seed0["mergekit_regmean"]["test_correct"]  # stock mergekit run_merge, merge_method: regmean
    assert seed0["mergekit_regmean"]["recipe"]["merge_method"] == "regmean"
    for task in TASKS:
        for other in (ours, mergekit):
            flips = sum(a != b for a, b in zip(theirs[task], other[task]))
            assert len(theirs[task]) == len(other[task]) and flips <= 1, (task, flips)
    pave = seed0["pave_delta_spectral_regmean_ours"]
    assert pave["pave"]["final_path"] == "pave_plugins.fusion_bench.PAVEAlgorithm"
    assert pave["hp"]["ratio"] == 0.9

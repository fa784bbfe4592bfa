"""The trained-heads protocol of ``pave bench`` (CI-sized: tiny random BERT, two tasks), the
paper-like fine-tuning options, RegMean through FusionBench, grid-edge extension, and the paired
bootstrap against an exact enumeration of all resamples on a toy case."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from bench_helpers import DATA, TASKS, tiny_bert_folder


def test_trained_heads_protocol_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from pave_plugins.bench.harness import BenchConfig, run
    from pave_plugins.bench.training import HEAD_PREFIX

    cfg = BenchConfig(data_dir=str(DATA), tasks=TASKS, model_path=tiny_bert_folder(tmp_path / "model"),
                      out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), seeds=[0], steps=30,
                      lr=2e-3, max_length=32, cov_examples=64, val_per_class=10, test_per_class=30,
                      methods=["ta", "regmean", "pave_delta_spectral"], ta_grid=[0.05, 0.1], regmean_grid=[0.5],
                      rho_grid=[0.9375], pave_targets=["delta"], pave_allocations=["spectral"], pave_bases=["ta"],
                      protocol="trained-heads", schedule="linear", train_embeddings=True, extend_grids=1)
    run(cfg)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    seed0 = saved["per_seed"][0]["methods"]
    # "regmean" is a key prefix: it selects FusionBench's RegMean and ours (regmean_ours)
    assert set(saved["summary"]) == {"zero_shot", "individual", "ta", "regmean", "regmean_ours", "pave_delta_spectral_ta"}
    # each task's own trained head, stored with its fine-tune; heads are not in the merged state dicts
    files = sorted((tmp_path / "cache" / "finetunes").glob("*.safetensors"))
    from safetensors.torch import load_file

    heads = [{k: v for k, v in load_file(str(f)).items() if k.startswith(HEAD_PREFIX)} for f in files]
    assert [sorted(h) for h in heads] == [[HEAD_PREFIX + "bias", HEAD_PREFIX + "weight"]] * 2
    classes = {f.name.split("-")[0]: h[HEAD_PREFIX + "weight"].shape[0] for f, h in zip(files, heads)}
    assert classes == {"sentiment": 2, "dictionary": 3}
    # the heads were trained (a tiny random BERT learns little in 30 steps: no accuracy bar here)
    torch.manual_seed(0)
    init = torch.nn.Linear(32, 2)
    sentiment = next(h for f, h in zip(files, heads) if f.name.startswith("sentiment"))
    assert not torch.allclose(sentiment[HEAD_PREFIX + "weight"], init.weight)
    # embeddings trained: the word embeddings moved; ||tau||/||W|| reported per task
    tv = saved["task_vector_ratio"]
    assert set(tv) == set(TASKS) and all(0 < v["all"] < 1 and v["linear"] > 0 for v in tv.values())
    # per-example predictions kept and consistent with the accuracies
    for key, m in seed0.items():
        for t in TASKS:
            c = m["test_correct"][t]
            assert len(c) == 30 * (2 if t == "sentiment" else 3)
            assert abs(100.0 * c.count("1") / len(c) - m["test"][t]) < 1e-9, key
    # TA's best lambda was on the lower edge of [0.05, 0.1] or the upper one: the grid was extended once
    assert seed0["ta"]["hp"]["lambda"] in (0.025, 0.05, 0.1, 0.15)
    assert len(seed0["ta"]["val_trace"]) == 3
    # the bootstrap table of PAVE+TA against TA
    sig = saved["significance"]["pave_delta_spectral_ta"]
    assert sig["against"] == "ta" and sig["avg"]["lo"] <= sig["avg"]["diff"] <= sig["avg"]["hi"]
    assert "Paired bootstrap" in (tmp_path / "out" / "results.md").read_text()


def test_regmean_matches_closed_form():
    """FusionBench's RegMean fed the harness's Gram matrices = (sum G_i)^-1 sum G_i W_i^T per linear
    layer, other parameters averaged (written out here with numpy in float64)."""
    from fusion_bench import BaseModelPool

    from pave_plugins.bench.regmean import regmean_merge
    from pave_plugins.collect.collector import CovarianceSet

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)) for _ in range(3)]
    grams = []
    for _ in range(2):
        x = torch.randn(20, 4, dtype=torch.float64)
        grams.append(CovarianceSet(covariances={"c": x.T @ x}, layer_map={"0": "c"}))
    pool = BaseModelPool({"_pretrained_": models[0], "a": models[1], "b": models[2]})
    merged = regmean_merge(pool, ["a", "b"], grams, reduce_non_diagonal_ratio=0.5)
    gs, ws = [], []
    for g, m in zip(grams, models[1:]):
        g = g.covariances["c"].numpy().copy()
        g = g * 0.5 + np.diag(np.diag(g)) * 0.5
        gs.append(g)
        ws.append(m[0].weight.detach().double().numpy())
    expected = np.linalg.solve(sum(gs), sum(g @ w.T for g, w in zip(gs, ws))).T
    assert np.abs(merged[0].weight.detach().double().numpy() - expected).max() < 1e-4
    bias = (models[1][0].bias + models[2][0].bias).detach() / 2
    assert torch.allclose(merged[0].bias.detach(), bias, atol=1e-6)


def test_grid_extension():
    from pave_plugins.bench.choice import grid_extension

    grid = [{"lambda": v} for v in (0.6, 1.0, 1.5)]
    assert grid_extension(grid, {"lambda": 0.6}) == [{"lambda": 0.3}]
    assert grid_extension(grid, {"lambda": 1.5}) == [{"lambda": 2.0}]
    assert grid_extension(grid, {"lambda": 1.0}) == []
    dare = [{"lambda": v, "sparsity": s} for s in (0.5, 0.9) for v in (0.4, 0.8)]
    assert grid_extension(dare, {"lambda": 0.8, "sparsity": 0.9}) == [{"lambda": 1.2, "sparsity": 0.9}]
    assert grid_extension([{"ratio": 0.5}, {"ratio": 0.9}], {"ratio": 0.9}) == [{"ratio": 1.0}]
    assert grid_extension([{"ratio": 0.5}, {"ratio": 1.0}], {"ratio": 1.0}) == []


def _exact_bootstrap(a, b):
    """All n^n resamples of every task (equally likely), enumerated: the exact bootstrap distribution
    of the task-average difference, as (values, probabilities)."""
    per_task = []
    for t in a:
        d = 100.0 * (np.asarray(b[t], float) - np.asarray(a[t], float)).mean(0)
        n = d.size
        per_task.append([float(np.mean([d[i] for i in idx])) for idx in itertools.product(range(n), repeat=n)])
    values = [sum(c) / len(c) for c in itertools.product(*per_task)]
    return np.asarray(values)


def test_paired_bootstrap_against_exact_enumeration():
    from pave_plugins.bench.significance import paired_bootstrap, verdict

    a = {"x": ["0110", "0100"], "y": ["101", "001"]}  # two seeds, the same examples
    b = {"x": ["1110", "1101"], "y": ["111", "011"]}
    got = paired_bootstrap(a, b, n_boot=200_000, seed=1)
    exact = _exact_bootstrap({t: [[int(c) for c in s] for s in v] for t, v in a.items()},
                             {t: [[int(c) for c in s] for s in v] for t, v in b.items()})
    d_x = 100.0 * np.mean([1, 0, 0, 1]) / 1  # per example, mean over seeds: (1,0,0,0) and (1,0,0,1) -> 0.5,0,0,0.5
    assert got["x"]["diff"] == pytest.approx(100.0 * np.mean([(1 + 1) / 2, 0, 0, (0 + 1) / 2]) / 1)
    assert got["avg"]["diff"] == pytest.approx(float(exact.mean()))
    assert d_x > 0
    lo, hi = np.quantile(exact, [0.025, 0.975])
    assert got["avg"]["lo"] == pytest.approx(lo, abs=1.5) and got["avg"]["hi"] == pytest.approx(hi, abs=1.5)
    p_exact = min(1.0, 2 * min(float(np.mean(exact <= 0)), float(np.mean(exact >= 0))))
    assert got["avg"]["p"] == pytest.approx(p_exact, abs=0.01)
    assert verdict(got["avg"]) == ("gain" if lo > 0 else "no difference")
    with pytest.raises(ValueError):
        paired_bootstrap({"x": ["01"]}, {"x": ["011"]})

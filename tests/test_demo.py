"""The built-in example (README command 1) runs end to end through the real host code paths."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from pave_plugins.cli import main
from pave_plugins.demo import run_demo


def test_demo_end_to_end(tmp_path):
    res = run_demo(tmp_path, num_tasks=2, steps=40)
    acc = res.accuracy
    # fine-tuning learns each toy task; the random base does not
    assert acc["fine-tune 0"][0] > 0.9 and acc["fine-tune 1"][1] > 0.9
    assert max(acc["base"]) < 0.2
    # mergekit's task_arithmetic output equals base + lambda * sum of task vectors, from the files
    base = load_file(tmp_path / "base" / "model.safetensors")
    fts = [load_file(tmp_path / f"ft_task_{k}" / "model.safetensors") for k in range(2)]
    merged = load_file(tmp_path / "merged_task_arithmetic" / "model.safetensors")
    for name, w0 in base.items():
        expected = w0 + sum(ft[name] - w0 for ft in fts)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    # the pave report respects the budget of Algorithm 1 on every purified layer
    report = json.loads((tmp_path / "merged_pave_task_arithmetic" / "pave_rank_report.json").read_text())
    assert report["complete"] and report["n_purified"] == len(res.ranks) > 0
    for layer, ranks in res.ranks.items():
        assert sum(ranks) <= 15 / 16 * len(ranks) * res.full_ranks[layer]
    assert all(0.9 < r <= 1 for r in res.model_ratios)
    for name in ("recipe_task_arithmetic.yaml", "recipe_pave_task_arithmetic.yaml", "recipe_tsv_m.yaml"):
        assert "merge_method" in (tmp_path / name).read_text()


def test_demo_cli_prints_table(capsys):
    assert main(["demo", "--tasks", "2", "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "PAVE + task arithmetic" in out and "rho_i" in out and "TSV-M" in out

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
    merged = load_file(tmp_path / "merged" / "task_arithmetic" / "model.safetensors")
    for name, w0 in base.items():
        expected = w0 + sum(ft[name] - w0 for ft in fts)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    # the pave report respects the budget of Algorithm 1 on every purified layer
    report = json.loads((tmp_path / "merged" / "pave_ta" / "pave_rank_report.json").read_text())
    assert report["complete"] and report["n_purified"] == len(res.ranks) > 0
    for layer, ranks in res.ranks.items():
        assert sum(ranks) <= 15 / 16 * len(ranks) * res.full_ranks[layer]
    assert all(0.9 < r <= 1 for r in res.model_ratios)
    for name in ("task_arithmetic", "ties", "pave_ta", "pave_ties", "pave_dare_ties", "tsv_m"):
        assert "merge_method" in (tmp_path / "mergekit" / f"{name}.yaml").read_text()
    # a complete folder: tokenizers, calibration data, covariance files, FusionBench configs, bench inputs
    from transformers import AutoTokenizer

    for model in ("base", "ft_task_0", "ft_task_1", "merged/pave_ta"):
        tok = AutoTokenizer.from_pretrained(tmp_path / model)
        assert tok("w3 w5")["input_ids"] == [3, 5]
    for k in range(2):
        record = json.loads((tmp_path / "data" / f"task_{k}.jsonl").read_text().splitlines()[0])
        assert set(record) == {"text", "input", "target"} and record["text"] == record["input"] + " " + record["target"]
        assert (tmp_path / "covs" / f"task_{k}.safetensors").is_file()
    for name in ("modelpool/pave_demo.yaml", "method/pave_demo/pave_ta.yaml", "method/pave_demo/tsv_m.yaml"):
        assert (tmp_path / "fusion_bench" / name).is_file()
    for name in ("model/tokenizer.json", "data/colours/labels.json", "data/animals/test.jsonl"):
        assert (tmp_path / "bench" / name).is_file()


def test_demo_cli_prints_table(capsys):
    assert main(["demo", "--tasks", "2", "--steps", "5"]) == 0
    captured = capsys.readouterr()
    assert "PAVE + task arithmetic" in captured.out and "rho_i" in captured.out and "TSV-M" in captured.out
    # without --out nothing is kept, and no path of the removed temporary folder is printed
    assert "nothing kept" in captured.out
    assert "pave-demo-" not in captured.out + captured.err

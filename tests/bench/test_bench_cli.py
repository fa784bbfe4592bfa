"""``pave bench`` front end: data paths, output folder, --help defaults, and results without machine paths."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pave_plugins.bench.portable import model_label, portable
from pave_plugins.cli import build_parser, main
from pave_plugins.cli.bench import DEFAULT_DATA, new_out_dir, resolve_data

REPO = Path(__file__).resolve().parents[2]
MACHINE_PATH = re.compile(r"(?<![\w.<])/(work|tmp|home|root|Users|var/folders)/")


def _task(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "labels.json").write_text(json.dumps({"labels": ["a", "b"]}))


def test_missing_data_folder_is_named(tmp_path, caplog):
    missing = tmp_path / "nope"
    assert main(["bench", "--device", "cpu", "--data", str(missing), "--model", str(tmp_path)]) == 2
    assert f"--data {missing}: folder not found: {missing}" in caplog.text


def test_missing_task_folder_is_named_with_the_tasks_found(tmp_path, caplog):
    _task(tmp_path / "data" / "alpha")
    argv = ["bench", "--device", "cpu", "--data", str(tmp_path / "data"), "--tasks", "alpha", "beta",
            "--model", str(tmp_path)]
    assert main(argv) == 2
    assert f"no task folder {tmp_path / 'data' / 'beta'}" in caplog.text
    assert "task folders in" in caplog.text and "alpha" in caplog.text


def test_default_data_is_found_from_another_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_data(DEFAULT_DATA, ["sentiment"]) == (REPO / DEFAULT_DATA).resolve()


def test_default_out_is_a_new_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = new_out_dir()
    assert first.startswith("pave-bench-") and not Path(first).exists()
    Path(first).mkdir()
    second = new_out_dir()
    assert second != first and not Path(second).exists()


def test_help_shows_defaults():
    sub = build_parser()._subparsers._group_actions[0].choices["bench"]
    text = " ".join(sub.format_help().split())
    for expected in ("(default: 100)", "(default: auto)", "$XDG_CACHE_HOME or ~/.cache", "pave-bench-YYYYmmdd-HHMMSS",
                     "(default: benchmarks/real/data", "TA lambda grid (default: 0.2 0.4 0.6 0.8 1.0)"):
        assert expected in text, expected
    assert "(default: None)" not in text


def test_results_name_the_model_package_and_no_machine_paths(tmp_path):
    torch_dir = Path(torch.__file__).parent
    assert model_label(str(torch_dir / "some_model")).startswith("torch==")  # a model inside an installed package
    assert model_label(str(tmp_path / "my-model")) == "my-model"
    cfg = SimpleNamespace(model_path=str(tmp_path / "m"), cache_dir=str(tmp_path / "cache"),
                          out_dir=str(tmp_path / "out"), data_dir=str(tmp_path / "data"))
    record = {"config": {"model_path": cfg.model_path, "cache_dir": cfg.cache_dir},
              "recipe": f"base_model: {cfg.cache_dir}/mergekit/base\nmodels:\n  - model: {cfg.cache_dir}/ft",
              "files": [f"{cfg.out_dir}/x.json", f"{cfg.data_dir}/t/labels.json"]}
    clean = portable(record, cfg)
    assert clean == {"config": {"model_path": "m", "cache_dir": "<cache>"},
                     "recipe": "base_model: <cache>/mergekit/base\nmodels:\n  - model: <cache>/ft",
                     "files": ["<out>/x.json", "<data>/t/labels.json"]}


@pytest.mark.parametrize("folder", ["benchmarks/real/results", "docs", "configs"])
def test_committed_files_hold_no_machine_paths(folder):
    files = [p for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix in (".json", ".md", ".yaml", ".yml")]
    files += [REPO / "README.md", REPO / "benchmarks" / "README.md"]
    for f in files:
        hits = MACHINE_PATH.findall(f.read_text(encoding="utf-8"))
        assert not hits, f"{f.relative_to(REPO)}: {hits[:3]}"


def test_machine_path_pattern_matches():
    assert MACHINE_PATH.search('"cache_dir": "/work/bench_cache"') and MACHINE_PATH.search("at /tmp/tmpab12/covs")
    assert not MACHINE_PATH.search("<tmp>/covs")  # placeholders pass

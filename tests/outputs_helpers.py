"""Shared set-up of the output-safety tests: tiny model families (``fam``, ``seq``, ``col``, ``own``
fixtures), the ``pave`` runner that captures a command's one-line error, mergekit recipes, and the check that
an output folder is ready to publish (``check_publishable``)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from inputs_helpers import snapshot
from mergekit_helpers import build_family, write_covariances

RHO = 0.875


def pave(argv, capsys, caplog) -> tuple[int, str]:
    """Run ``pave ARGV`` in-process: (exit status, what it said on stderr and in the log)."""
    from pave_plugins.cli import main

    caplog.clear()
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse refuses a value
        code = exc.code
    err = capsys.readouterr().err
    return code, err + "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def snap_all(*paths: Path) -> dict:
    return {str(p): snapshot(p) for p in paths}


def purify_args(fam, out, models=None, covs=None, *extra):
    argv = ["purify", "--base", fam["base"]]
    for m, c in zip(models or fam["fts"], covs or fam["covs"]):
        argv += ["--model", m, "--covariance", c]
    return argv + ["--rho", RHO, "--out", out, *extra]


def merge(config: dict, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(config), str(out),
              options=MergeOptions(copy_tokenizer=False, quiet=True), config_source=yaml.safe_dump(config))


def pave_recipe(fam, *, weights=True, inner="ties", covs=None, extra_global=None) -> dict:
    models = []
    for ft, c in zip(fam["fts"], covs or fam["covs"]):
        p = {"covariance": str(c)}
        if weights:
            p.update(weight=1.0, density=0.5)
        models.append({"model": str(ft), "parameters": p})
    return {"merge_method": "pave", "base_model": str(fam["base"]), "models": models,
            "parameters": {"inner": inner, "rho": RHO, **(extra_global or {})}, "dtype": "float32"}


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """A user's working folder: base, two fine-tunes, their covariance files and a notes file."""
    root = tmp_path_factory.mktemp("work")
    base, fts = build_family("llama", root, n_models=2)
    covs = [write_covariances(d, root / f"cov{i}.safetensors", seed=10 + i) for i, d in enumerate(fts)]
    (root / "notes.txt").write_text("my experiment notes\n")
    return {"root": root, "base": base, "fts": fts, "covs": covs}


@pytest.fixture
def own(fam, tmp_path):
    """A private copy of the working folder, for cases that would destroy it if the check failed."""
    root = tmp_path / "work"
    shutil.copytree(fam["root"], root)
    return {"root": root, "base": root / fam["base"].name, "fts": [root / f.name for f in fam["fts"]],
            "covs": [root / c.name for c in fam["covs"]]}


@pytest.fixture(scope="module")
def seq(tmp_path_factory):
    from rethink_helpers import build_seq_cls

    root = tmp_path_factory.mktemp("rethink")
    dirs, calib, _ = build_seq_cls(root)
    return {"root": root, "dirs": dirs, "calib": calib}


@pytest.fixture(scope="module")
def col(tmp_path_factory):
    from collect_helpers import TEXTS, save_model_dir, write_jsonl

    root = tmp_path_factory.mktemp("collect")
    model = save_model_dir(root / "model")
    data = write_jsonl(root / "d.jsonl", [{"text": t} for t in TEXTS])
    return {"root": root, "model": model, "data": data}


def rethink_args(seq, out, *extra):
    r = seq["root"]
    return ["rethink", "--base", r / "base", "--merged", r / "merged",
            "--calib", *[f"{t}={p}" for t, p in seq["calib"].items()],
            "--heads", *[f"{t}={d}" for t, d in seq["dirs"].items()], "--epochs", "1", "--iterations", "1",
            "--no-progress", "--device", "cpu", "--out", out, *extra]


class Killer:
    """Start a command; SIGKILL it ``delay`` s after ``ready()`` is true or ``line`` shows on stderr."""

    def __init__(self, argv, *, line: str | None = None, ready=None, delay: float = 0.0, timeout: float = 120):
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.line, self.ready, self.delay, self.timeout = line, ready, delay, timeout
        self.stderr: list[str] = []
        self.killed_while_running = False
        self._seen = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for ln in self.proc.stderr:  # type: ignore[union-attr]
            self.stderr.append(ln)
            if self.line and self.line in ln:
                self._seen.set()

    def run(self):
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.timeout and self.proc.poll() is None:
            if self._seen.is_set() or (self.ready is not None and self.ready()):
                if self.delay:
                    time.sleep(self.delay)
                break
            time.sleep(0.005)
        self.t_kill = time.monotonic() - t0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.killed_while_running = True
        self.proc.wait(timeout=30)
        return self


def check_publishable(folder: Path, tags: set[str], machine: Path) -> None:
    """``folder`` loads with transformers, its card parses (``huggingface_hub.ModelCard``) with
    ``library_name``, at least ``tags`` and no ``base_model`` (local models), and names no local path."""
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(folder)
    AutoTokenizer.from_pretrained(folder)
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers", folder
    assert tags <= set(card.data.tags), (folder, card.data.tags)
    assert card.data.base_model is None, (folder, card.data.base_model)  # local models: no Hub id
    text = card.content
    assert str(machine) not in text and str(machine.resolve()) not in text, folder
    assert not re.search(r"(?<![\w.:/~}-])/(tmp|home|root|usr|var|work)/", text), folder
    assert "replaced by their folder names" in text, folder

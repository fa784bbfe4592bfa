"""Shared set-up of the bad-input tests: one tiny Llama family with covariances, a collect-ready model,
a LoRA-DV set-up (the ``env`` fixture), and the argv builders and snapshots the cases use."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from pave_plugins.io.covariance import (
    CovarianceFile,
    CovarianceMetadata,
    save_covariances,
)
from safetensors.torch import load_file, save_file

from mergekit_helpers import build_family, write_covariances

RHO = 0.875


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    base, fts = build_family("llama", root, n_models=2)
    covs = [write_covariances(d, root / f"cov{i}.safetensors", seed=10 + i) for i, d in enumerate(fts)]
    # collect: a tiny Llama with a tokenizer, and a data file
    from collect_helpers import TEXTS, save_model_dir, tiny_llama
    from collect_helpers import write_jsonl as cwrite

    cdir = save_model_dir(root / "collect_model", tiny_llama())
    data = cwrite(root / "texts.jsonl", [{"text": t} for t in TEXTS])
    # rethink: tiny BERT classifiers + merged model + calibration files
    from rethink_helpers import build_seq_cls

    rroot = root / "rethink"
    rroot.mkdir()
    dirs, calib, _ = build_seq_cls(rroot)
    return {
        "root": root, "base": base, "fts": fts, "covs": covs, "cdir": cdir, "data": data,
        "rroot": rroot, "rcalib": calib,
    }


def cli(argv: list[str]) -> int:
    """Run a ``pave`` sub-command through its argparse front end, letting exceptions through
    (``pave_plugins.cli.main`` would turn them into exit code 2 and a log line)."""
    from pave_plugins.cli import build_parser

    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def purify_argv(env, out: Path, models=None, covs=None, base=None, extra=()) -> list[str]:
    models = env["fts"] if models is None else models
    covs = env["covs"] if covs is None else covs
    argv = ["purify", "--base", str(base or env["base"])]
    for m, c in zip(models, covs):
        argv += ["--model", str(m), "--covariance", str(c)]
    return argv + ["--rho", str(RHO), "--out", str(out), *extra]


def copy_model(src: Path, dst: Path, edit: Callable[[dict], dict] | None = None) -> Path:
    shutil.copytree(src, dst)
    if edit is not None:
        f = dst / "model.safetensors"
        save_file(edit(load_file(str(f))), str(f), metadata={"format": "pt"})
    return dst


def cov_variant(env, path: Path, change: Callable[[str, torch.Tensor], torch.Tensor], src: int = 1,
                drop_layers: tuple[str, ...] = (), fingerprint: str = "") -> Path:
    cf = CovarianceFile(env["covs"][src])
    with __import__("safetensors").safe_open(str(cf.path), framework="pt") as f:
        tensors = {k: change(k, f.get_tensor(k)) for k in f.keys()}
    layer_map = {k: v for k, v in cf.metadata.layer_map.items() if not any(d in k for d in drop_layers)}
    tensors = {k: v for k, v in tensors.items() if k in set(layer_map.values())}
    save_covariances(path, tensors, CovarianceMetadata(layer_map=layer_map, model_fingerprint=fingerprint, n_tokens=1))
    return path


def snapshot(path: Path):
    """What is at ``path``: None, the bytes hash of a file, or {relative path: hash} of a folder."""
    if not path.exists():
        return None
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def temp_siblings(path: Path) -> list[str]:
    if not path.parent.is_dir():
        return []
    return [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.") and p.name.endswith(".tmp")]


def rethink_argv(env, out, merged=None, calib=None, extra=()):
    r = env["rroot"]
    calib = calib if calib is not None else [f"{t}={p}" for t, p in env["rcalib"].items()]
    return ["rethink", "--base", str(r / "base"), "--merged", str(merged or r / "merged"), "--calib", *calib,
            "--epochs", "1", "--iterations", "1", "--no-progress", "--device", "cpu", "--out", str(out), *extra]


def run_pave(argv) -> tuple[int, list[str], str]:
    """``pave ARGV`` through its entry point: (exit status, ERROR lines, everything it logged)."""
    from pave_plugins.cli import main

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    finally:
        root.removeHandler(handler)
    text = "\n".join(r.getMessage() for r in records)
    return code, [r.getMessage() for r in records if r.levelno >= logging.ERROR], text

"""Robustness: an interrupted ``pave collect`` / ``pave purify`` / ``pave rethink``
leaves either the old output or the complete new one, never half of it.

Each command runs in a subprocess over an existing (old) output with ``--overwrite`` and is killed
with SIGKILL once it is working: ``pave purify`` as soon as its temporary output folder appears (it
is then writing tensors into it), ``pave collect`` and ``pave rethink`` shortly after their "working"
log line (collecting / training). The old output must then be byte-for-byte unchanged (or, had the
command won the race, complete). The three subprocesses run concurrently to keep the test short.
A rerun after the kill succeeds and removes the staging sibling the kill left
(``.<name>.pave-<pid>-<token>.new``).
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
import torch
from inputs_helpers import snapshot
from outputs_helpers import Killer

PAVE = [sys.executable, "-c", "import sys; from pave_plugins.cli import main; sys.exit(main(sys.argv[1:]))"]




def _old_dir(path: Path, marker: str, who: str = "pave rethink") -> Path:
    """An earlier output of a command (written through the output transaction, so it carries the
    command's ownership record), which --overwrite may replace."""
    from pave_plugins.io.output import output_folder

    with output_folder(path, who=who) as tmp:
        (tmp / "config.json").write_text('{"old": true}')
        (tmp / "model.safetensors").write_bytes(b"old weights")
        (tmp / marker).write_text('{"format": "old"}')
    return path


def _old_purify_dir(path: Path) -> Path:
    from pave_plugins.io.output import output_folder

    with output_folder(path, who="pave purify") as tmp:
        (tmp / "pave_rank_report.json").write_text('{"old": true}')
        (tmp / "ft0").mkdir()
        (tmp / "ft0" / "pave_purify.json").write_text('{"old": true}')
        (tmp / "ft0" / "model.safetensors").write_bytes(b"old weights")
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Inputs big enough that each command works for a few seconds."""
    from transformers import LlamaForCausalLM

    from collect_helpers import TEXTS, save_model_dir, tiny_llama, write_jsonl
    from mergekit_helpers import write_covariances
    from rethink_helpers import build_seq_cls
    from tiny_models import tiny_llama_config

    root = tmp_path_factory.mktemp("kill")
    # purify: a Llama with 4 layers of 128 x 256, two fine-tunes
    torch.manual_seed(0)
    cfg = tiny_llama_config(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_key_value_heads=4)
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(root / "base")
    fts, covs = [], []
    for i in range(2):
        ft = LlamaForCausalLM(cfg)
        ft.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        ft.save_pretrained(root / f"ft{i}")
        fts.append(root / f"ft{i}")
        covs.append(write_covariances(root / f"ft{i}", root / f"cov{i}.safetensors", seed=i))
    # collect: a tiny Llama and many texts (one per batch)
    cdir = save_model_dir(root / "cmodel", tiny_llama())
    data = write_jsonl(root / "texts.jsonl", [{"text": t} for t in TEXTS * 500])
    # rethink: tiny BERT classifiers, many epochs
    rroot = root / "rethink"
    rroot.mkdir()
    dirs, calib, _ = build_seq_cls(rroot)
    return {"root": root, "base": root / "base", "fts": fts, "covs": covs, "cdir": cdir, "data": data,
            "rroot": rroot, "rdirs": dirs, "rcalib": calib}


def _purify_complete(out: Path, fts) -> bool:
    rep = out / "pave_rank_report.json"
    return rep.is_file() and json.loads(rep.read_text()).get("complete", True) and all(
        (out / f.name / "model.safetensors").is_file() for f in fts)


def test_kill_mid_run_leaves_old_or_complete_output(work, tmp_path):
    w = work
    # old outputs
    p_out = _old_purify_dir(tmp_path / "purified")
    c_out = tmp_path / "cov.safetensors"
    c_out.write_bytes(w["covs"][0].read_bytes())  # an earlier covariance file
    r_out = _old_dir(tmp_path / "rethought", "rethink.json")
    before = {k: snapshot(v) for k, v in (("p", p_out), ("c", c_out), ("r", r_out))}

    p_argv = PAVE + ["purify", "--base", str(w["base"])]
    for m, c in zip(w["fts"], w["covs"]):
        p_argv += ["--model", str(m), "--covariance", str(c)]
    p_argv += ["--rho", "0.875", "--out", str(p_out), "--overwrite"]
    c_argv = PAVE + ["collect", "--model", str(w["cdir"]), "--data", str(w["data"]), "--n-samples", "0",
                     "--batch-size", "1", "--max-length", "16", "--device", "cpu", "--no-progress",
                     "-o", str(c_out), "--overwrite"]
    r = w["rroot"]
    r_argv = PAVE + ["rethink", "--base", str(r / "base"), "--merged", str(r / "merged"),
                     "--calib", *[f"{t}={p}" for t, p in w["rcalib"].items()],
                     "--heads", *[f"{t}={d}" for t, d in w["rdirs"].items()],
                     "--epochs", "100000", "--iterations", "1", "--device", "cpu", "--no-progress",
                     "--out", str(r_out), "--overwrite"]

    def purify_tmp_exists():
        return any(p.name.startswith(".purified.pave-") and p.name.endswith(".new") for p in tmp_path.iterdir())

    killers = [
        Killer(p_argv, ready=purify_tmp_exists),
        Killer(c_argv, line="collecting on", delay=0.5),
        Killer(r_argv, line="rethink: seq-cls model", delay=2.0),
    ]
    threads = [threading.Thread(target=k.run) for k in killers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kp, kc, kr = killers
    # each was killed while running (else the test would prove nothing)
    for k, name in zip(killers, ("purify", "collect", "rethink")):
        assert k.killed_while_running, f"{name} finished before it could be killed: {''.join(k.stderr)[-2000:]}"

    # purify: old folder untouched, or the complete new one
    assert snapshot(p_out) == before["p"] or _purify_complete(p_out, w["fts"])
    # collect: old file untouched, or a complete covariance file
    if snapshot(c_out) != before["c"]:
        from pave_plugins.io.covariance import CovarianceFile

        assert CovarianceFile(c_out).layers
    # rethink: 100000 epochs cannot finish: the old folder must be untouched
    assert snapshot(r_out) == before["r"]
    # what a SIGKILL can leave: only hidden temporary siblings, never a half-written output
    for p in tmp_path.iterdir():
        assert p.name in ("purified", "cov.safetensors", "rethought") or (p.name.startswith(".") and ".pave-" in p.name), p

    # a rerun over the leftovers completes (in-process, fast)
    from pave_plugins.cli import main

    assert main(p_argv[len(PAVE):]) == 0
    assert _purify_complete(p_out, w["fts"])
    # ... and leaves no staging sibling of the killed run behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".purified.pave-")]

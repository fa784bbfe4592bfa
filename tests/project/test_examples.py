"""The runnable examples in examples/ work (the FusionBench one in-process; it is fast)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load():
    spec = importlib.util.spec_from_file_location("fusion_bench_api", EXAMPLES / "fusion_bench_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fusion_bench_api_example(capfd, tmp_path):
    module = _load()
    out = module.main(str(tmp_path))
    printed = capfd.readouterr().out
    assert "rho_i" in printed and "TSV-M" in printed
    ratios = list(out["report"]["model_ratios"].values())
    assert len(ratios) == 2 and all(0.85 < r < 1.0 for r in ratios)
    # the purified merge differs from plain task arithmetic on the same pool (PAVE did something)
    # but only on purified linear weights: embeddings follow plain TA exactly
    base, fts = module.build_models()
    emb = "model.embed_tokens.weight"
    ta_emb = base.state_dict()[emb] + 0.5 * sum(m.state_dict()[emb] - base.state_dict()[emb] for m in fts.values())
    torch.testing.assert_close(out["pave"].state_dict()[emb], ta_emb)


def test_fusion_bench_api_example_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    _load().main()
    assert list(tmp_path.iterdir()) == []


def test_mergekit_example_outputs_are_publishable(tmp_path):
    """``examples/mergekit_end_to_end.sh``: no warning about its own recipes, and merges that load with
    transformers and carry a card ready for the Hub."""
    import os
    import subprocess
    import sys

    from outputs_helpers import check_publishable

    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               HF_HUB_OFFLINE="1")
    proc = subprocess.run(["bash", str(EXAMPLES / "mergekit_end_to_end.sh"), str(tmp_path / "ex")], env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "WARNING" not in out and "deprecated" not in out, out[-4000:]
    check_publishable(tmp_path / "ex" / "cli" / "pave_ta", {"merge", "mergekit", "pave"}, tmp_path)
    check_publishable(tmp_path / "ex" / "cli" / "tsv_m", {"merge", "mergekit", "tsv-m"}, tmp_path)

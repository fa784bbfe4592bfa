"""The GPU self-check's dry run (``--device cpu``): every user path through its real entry point
(``pave``, ``mergekit-yaml``, ``fusion_bench`` subprocesses), run twice on the CPU with the same
inputs, must give identical outputs, and the script must report each path and a summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--workers", "2",
                           "--work", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    paths = [p["path"] for p in result["paths"]]
    for prefix in ("pave collect", "mergekit-yaml pave+ties", "mergekit-yaml pave(delta)+task_arithmetic",
                   "mergekit-yaml tsv", "pave purify", "fusion_bench pave/pave_ties", "pave rethink"):
        assert any(p.startswith(prefix) for p in paths), (prefix, paths)
    for p in result["paths"]:
        assert p["ok"] and p["rel_diff"] == 0.0, p  # the same inputs on the same device: bit-identical
    assert f"{len(paths)} passed, 0 failed" in proc.stdout

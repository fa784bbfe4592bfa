"""What ``pave bench`` prints and records, on the demo's tiny bench inputs (a subprocess, as a user
runs it): the results table once; no FusionBench profiler tables or rich panels in the log; each
damped singular covariance at INFO and one summary warning; ``results.json`` naming only the PAVE
targets, allocations and bases that ran."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from pave_plugins.demo.folder import write_bench_inputs

PAVE = str(Path(sys.executable).with_name("pave"))


def test_bench_output_is_clean(tmp_path):
    bench = write_bench_inputs(tmp_path, 0)
    out = tmp_path / "out"
    proc = subprocess.run(
        [PAVE, "bench", "--model", str(bench / "model"), "--data", str(bench / "data"), "--tasks", "colours",
         "animals", "--seeds", "0", "--steps", "20", "--lr", "2e-3", "--methods", "ta", "pave_delta_spectral",
         "--pave-bases", "ta", "--ta-grid", "1.0", "--rho", "0.9375", "--device", "cpu", "--out", str(out),
         "--cache", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count("| method |") == 1, log[-4000:]
    assert "Profiler Report" not in log and "Instantiate by calling" not in log and "╭" not in log
    damped = [line for line in log.splitlines() if "is singular: damped" in line]
    assert damped and all(" INFO " in line for line in damped)
    (summary,) = [line for line in log.splitlines() if "singular covariances were damped" in line]
    assert " WARNING " in summary and re.search(rf"pave: {len(damped)} singular covariances", summary)
    config = json.loads((out / "results.json").read_text())["config"]
    assert (config["pave_targets"], config["pave_allocations"], config["pave_bases"]) == (["delta"], ["spectral"], ["ta"])

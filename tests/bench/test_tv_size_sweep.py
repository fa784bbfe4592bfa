"""benchmarks/tv_size_sweep.py: a run that is still in progress (results rewritten after every
method, a running seed marked partial) is neither taken as finished nor plotted."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_sweep():
    spec = importlib.util.spec_from_file_location("tv_size_sweep", ROOT / "benchmarks" / "tv_size_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def results(steps: int, partial: bool, diff: float) -> dict:
    return {
        "config": {"steps": steps},
        "per_seed": [{"seed": 0, **({"partial": True} if partial else {})}],
        "task_vector_ratio": {"a": {"all": 0.01 * steps}, "b": {"all": 0.03 * steps}},
        "summary": {"ta": {"avg": 70.0}, "pave_ta": {"avg": 70.0 + diff, "label": "PAVE + TA"}},
        "significance": {"pave_ta": {"against": "ta", "avg": {"diff": diff, "lo": diff - 1, "hi": diff + 1, "p": 0.5}}},
    }


def test_partial_runs_are_not_finished_and_not_collected(tmp_path):
    sweep = load_sweep()
    assert sweep.finished(results(100, False, 1.0), [0])
    assert not sweep.finished(results(100, True, 1.0), [0])
    assert not sweep.finished(results(100, False, 1.0), [0, 1])
    for steps, partial, diff in [(30, False, -2.0), (100, True, 5.0), (300, False, 0.5)]:
        (tmp_path / f"steps{steps}").mkdir()
        (tmp_path / f"steps{steps}" / "results.json").write_text(json.dumps(results(steps, partial, diff)))
    rows = sweep.collect(tmp_path)
    assert [(r["steps"], r["avg_diff"], r["pave_avg"]) for r in rows] == [(30, -2.0, 68.0), (300, 0.5, 70.5)]
    assert rows[0]["tv_ratio"] == (0.3 + 0.9) / 2 and rows[1]["against"] == "ta"

"""The rank report (``pave_plugins.engine.report``): Algorithm 1 line 15 over generated records,
tensor order, the JSON written and read back, and what a summary says."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pave_plugins.engine.report import RankReport, RegMeanReport, is_rank_report

MODELS = ["a", "b", "c"]


@st.composite
def records(draw):
    """Tensor name -> a step record: each model purified (rank <= full rank) or not."""
    names = draw(st.lists(st.from_regex(r"layers\.[0-9]{1,2}\.(q|k|mlp)\.weight", fullmatch=True), min_size=1,
                          max_size=8, unique=True))
    out = {}
    for name in names:
        full = draw(st.integers(1, 40))
        models = {}
        for m in MODELS:
            if draw(st.booleans()):
                models[m] = {"purified": True, "rank": draw(st.integers(1, full)), "full_rank": full,
                             "damping": 0.0, "relative_damping": 0.0, "relative_change": 0.1, "pruning_error": 0.0,
                             "covariance_key": "k"}
            else:
                models[m] = {"purified": False, "reason": "no covariance for this layer"}
        purified = any(r["purified"] for r in models.values())
        out[name] = ({"purified": True, "full_rank": full, "budget_met": True, "models": models} if purified
                     else {"purified": False, "models": models})
    return out


@settings(max_examples=60, deadline=None)
@given(recs=records())
def test_model_ratios_are_line_15_over_the_purified_tensors(recs):
    report = RankReport()
    for name, rec in recs.items():
        report.add_tensor(name, rec, {"rho": 0.9})
    for m in MODELS:
        kept = [r["models"][m]["rank"] for r in recs.values() if r["models"][m]["purified"]]
        full = [r["models"][m]["full_rank"] for r in recs.values() if r["models"][m]["purified"]]
        expected = sum(kept) / sum(full) if full else None
        assert report.model_ratios()[m] == (pytest.approx(expected) if expected is not None else None)


@settings(max_examples=60, deadline=None)
@given(recs=records())
def test_tensors_in_natural_order_and_counts(recs):
    report = RankReport()
    for name in reversed(list(recs)):  # any arrival order (mergekit's parallel executors)
        report.add_tensor(name, recs[name], {})
    d = report.to_dict()

    def layer_then_rest(name):
        i = int(re.search(r"layers\.(\d+)\.", name).group(1))
        return (i, name)

    assert list(d["tensors"]) == sorted(recs, key=layer_then_rest)
    assert d["n_tensors"] == len(recs)
    assert d["n_purified"] == sum(r["purified"] for r in recs.values())
    assert sorted(d["plain_task_vector"]) == sorted(n for n, r in recs.items() if not r["purified"])


def test_written_report_reads_back_and_is_recognised(tmp_path):
    report = RankReport()
    report.add_tensor("layers.0.q.weight", {"purified": True, "full_rank": 4, "budget_met": False, "models": {
        "a": {"purified": True, "rank": 3, "full_rank": 4, "damping": 0.5, "relative_damping": 0.01,
              "relative_change": float("inf"), "pruning_error": 0.2, "covariance_key": "k"}}}, {"rho": 0.75})
    report.extra["algorithm_1_model_ratios"] = {"a": 0.75}
    path = report.write(tmp_path / "pave_rank_report.json")
    back = json.loads(path.read_text())
    assert back["model_ratios"] == {"a": 0.75} and back["budget_not_met"] == ["layers.0.q.weight"]
    assert back["algorithm_1_model_ratios"] == {"a": 0.75} and back["complete"] is False
    assert is_rank_report(path)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something"}))
    assert not is_rank_report(other) and not is_rank_report(tmp_path / "absent.json")
    assert report.partial_name == ".pave_rank_report.partial.json"


def test_summary_names_each_model_and_what_stayed_plain():
    report = RankReport()
    settings = {"rho": 0.5, "rank_allocation": "spectral", "target": "weight", "damping": 0.01, "damping_rule": "relative"}
    report.add_tensor("layers.0.q.weight", {"purified": True, "full_rank": 4, "budget_met": True, "models": {
        "a": {"purified": True, "rank": 2, "full_rank": 4, "damping": 0.1, "relative_damping": 0.01,
              "relative_change": 0.3, "pruning_error": 0.2, "covariance_key": "k"},
        "b": {"purified": False, "reason": "kept at full rank (full_rank_models)"}}},
        settings)
    report.add_tensor("norm.weight", {"purified": False, "models": {"a": {"purified": False, "reason": "1-D"}}},
                      settings)
    text = report.summary()
    assert "purified 1 of 2 tensors" in text and "a: rho_i=0.5000" in text and "damped covariances: 1" in text
    assert "b: nothing purified" in text and "plain task vector (no covariance / not 2-D): norm.weight" in text
    # damped as asked (damping 0.01 x mean diag C): no warning; beyond what was asked: a singular covariance
    assert report.final_warning() is None
    settings["damping"] = 0.001
    assert "1 singular covariances were damped (at most 0.01 x mean diag C" in report.final_warning()
    assert "no tensor was purified" in RankReport().final_warning()
    assert "every tensor was averaged" in RegMeanReport().final_warning()

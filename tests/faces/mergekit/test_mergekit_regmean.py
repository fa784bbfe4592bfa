"""mergekit ``regmean`` (arXiv 2212.09849) on covariance files written by ``pave collect``.

One stock ``mergekit-yaml`` subprocess run; the rest in-process through mergekit's ``run_merge``.
References are independent: RegMean's formula solved with ``torch.linalg.solve`` in float64 from the
files' Gram matrices, and ``pave`` with ``inner: regmean`` against ``regmean`` on the checkpoints
``pave purify`` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from collect_helpers import collected_family, tiny_llama
from mergekit_helpers import load_tensors, run_mergekit_yaml
from mergekit_helpers import run_inprocess

from pave_plugins.io.covariance import CovarianceFile

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "mergekit"


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """A tiny Llama base, two fine-tunes (random updates) and their covariance files from `pave collect`."""
    return collected_family(tmp_path_factory.mktemp("regmean"), tiny_llama)


def recipe(fam, method="regmean", params="", covs=None, base=True):
    covs = fam["covs"] if covs is None else covs
    models = "\n".join(
        f"  - model: {ft}\n    parameters: {{covariance: {c}}}" if c else f"  - model: {ft}"
        for ft, c in zip(fam["fts"], covs)
    )
    head = f"merge_method: {method}\n" + (f"base_model: {fam['base']}\n" if base else "")
    return f"{head}models:\n{models}\nparameters:\n{params or '  {}'}\ndtype: float32\n"


def reference(fam, a=1.0, weighting="sum", rule="mean", lam=1.0):
    """RegMean written out: (sum_i G~_i)^{-1} sum_i G~_i W_i^T in float64 (LU solve), mean elsewhere."""
    base = load_tensors(fam["base"])
    fts = [load_tensors(d) for d in fam["fts"]]
    cfs = [CovarianceFile(c) for c in fam["covs"]]
    out = {}
    for name, b in base.items():
        ws = [ft[name].double() for ft in fts]
        if name in cfs[0]:
            grams = []
            for cf in cfs:
                g = cf.get(name).double()
                g = g / cf.metadata.counts[cf.key_for(name)] if weighting == "mean" else g
                grams.append(a * g + (1 - a) * torch.diag(torch.diagonal(g)))
            out[name] = torch.linalg.solve(sum(grams), sum(g @ w.T for g, w in zip(grams, ws))).T
        elif rule == "mean":
            out[name] = sum(ws) / len(ws)
        else:
            out[name] = b.double() + lam * sum(w - b.double() for w in ws)
    return out


def assert_matches(out: Path, ref: dict, tol=2e-6):
    merged = load_tensors(out)
    assert set(merged) == set(ref)
    for name, r in ref.items():
        err = float((merged[name].double() - r).norm() / r.norm())
        assert err < tol, (name, err)


def test_stock_mergekit_yaml_regmean_on_collected_covariances(fam):
    """`mergekit-yaml` finds `regmean`; the merge equals RegMean's formula; report and model card."""
    out = fam["root"] / "merged"
    params = "  reduce_non_diagonal_ratio: 0.9\n  gram_weighting: mean\n"
    r = run_mergekit_yaml(recipe(fam, params=params), out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_matches(out, reference(fam, a=0.9, weighting="mean"))
    report = json.loads((out / "regmean_report.json").read_text())
    n_linear = len(CovarianceFile(fam["covs"][0]).layers)
    assert report["complete"] and report["n_regmean"] == n_linear == 15
    assert report["settings"]["gram_weighting"] == "mean" and len(report["models"]) == 2
    rec = report["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    assert rec["regmean"] and "damping" in rec and "relative_damping" in rec
    assert report["tensors"]["model.norm.weight"] == {"regmean": False, "merged_by": "mean", "reason": "not a 2-D weight (1-D)"}
    card = (out / "README.md").read_text()
    assert "[RegMean (Dataless Knowledge Fusion by Merging Weights of Language Models)](https://arxiv.org/abs/2212.09849)" in card


def test_sum_weighting_and_task_arithmetic_fallback(fam, tmp_path):
    out = run_inprocess(recipe(fam, params="  non_linear: task_arithmetic\n  lambda: 0.5\n"), tmp_path / "o")
    assert_matches(out, reference(fam, rule="task_arithmetic", lam=0.5))
    # without a base model: the mean rule needs none
    out = run_inprocess(recipe(fam, base=False), tmp_path / "nobase")
    assert_matches(out, reference(fam))


def test_gram_sum_prepared_once_per_shared_input(fam, tmp_path):
    from pave_plugins.mergekit.regmean import regmean_merge_method

    store = regmean_merge_method.store
    start = store.n_prepared
    run_inprocess(recipe(fam), tmp_path / "o")
    n_keys = len(set(CovarianceFile(fam["covs"][0]).metadata.layer_map.values()))
    assert store.n_prepared - start == n_keys  # q/k/v, gate/up: one Gram sum each, for both models


def test_pave_inner_regmean_equals_regmean_on_purified_checkpoints(fam, tmp_path):
    from pave_plugins.cli import main

    purified = tmp_path / "purified"
    argv = ["purify", "--base", str(fam["base"])]
    for m, c in zip(fam["fts"], fam["covs"]):
        argv += ["--model", str(m), "--covariance", str(c)]
    assert main(argv + ["--rho", "0.875", "--out", str(purified)]) == 0
    params = "  inner: regmean\n  rho: 0.875\n  reduce_non_diagonal_ratio: 0.8\n"
    a = load_tensors(run_inprocess(recipe(fam, "pave", params), tmp_path / "pave"))
    on_purified = {**fam, "fts": [purified / ft.name for ft in fam["fts"]]}
    b = load_tensors(run_inprocess(recipe(on_purified, params="  reduce_non_diagonal_ratio: 0.8\n"), tmp_path / "rm"))
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)
    assert (tmp_path / "pave" / "pave_rank_report.json").exists() and (tmp_path / "pave" / "regmean_report.json").exists()


@pytest.mark.parametrize("name", ["regmean.yaml", "pave_regmean.yaml"])
def test_shipped_recipes(fam, tmp_path, name):
    text = (CONFIGS / name).read_text()
    for placeholder, real in [("/models/base", fam["base"]), ("/models/ft_task_a", fam["fts"][0]),
                              ("/models/ft_task_b", fam["fts"][1]), ("/covs/task_a.safetensors", fam["covs"][0]),
                              ("/covs/task_b.safetensors", fam["covs"][1])]:
        assert placeholder in text
        text = text.replace(placeholder, str(real))
    out = run_inprocess(text, tmp_path / "out")
    assert (out / "regmean_report.json").exists()


@pytest.mark.parametrize(
    "params, covs, pattern",
    [
        ("  reduce_non_diagonal_ratio: 1.5\n", None, r"reduce_non_diagonal_ratio must be a number in \[0, 1\]"),
        ("", "one", r"regmean: no covariance file for model\(s\) \['.*ft1'\]"),
        ("", "missing", r"covariance file not found: .*nope.safetensors"),
    ],
)
def test_bad_input(fam, tmp_path, params, covs, pattern):
    covs = {None: None, "one": [fam["covs"][0], None], "missing": [fam["covs"][0], tmp_path / "nope.safetensors"]}[covs]
    with pytest.raises(Exception, match=pattern):
        run_inprocess(recipe(fam, params=params, covs=covs), tmp_path / "o")


def test_task_arithmetic_without_base_is_refused(fam, tmp_path):
    with pytest.raises(Exception, match="non_linear 'task_arithmetic' needs a base_model"):
        run_inprocess(recipe(fam, params="  non_linear: task_arithmetic\n", base=False), tmp_path / "o")

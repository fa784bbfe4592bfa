"""GPT-2 stores its linear layers as ``Conv1D`` (``y = x W + b``, ``W`` is ``in x out``); PAVE's eq. 5-6
act on the ``out x in`` matrix ``W^T``. `pave collect` records the layout, and `pave purify` (the
engine step behind mergekit ``pave`` too) must purify ``W^T`` and store the transpose back, also for
the square attention projection where the wrong orientation would not raise."""

from __future__ import annotations

import json

import pytest
import torch
from collect_helpers import TEXTS, collected_family, tiny_gpt2
from independent_reference import eq5, ranks
from mergekit_helpers import load_tensors, run_mergekit_yaml

from pave_plugins.cli import main
from pave_plugins.io.covariance import CovarianceFile

CONV1D = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    # enough tokens (> 64, the MLP width) that no covariance is singular: the reference inverts C
    texts = [" ".join(t.split()[j:] + t.split()[:j]) for t in TEXTS for j in range(4)]
    return collected_family(tmp_path_factory.mktemp("gpt2"), tiny_gpt2, texts)


@pytest.mark.parametrize("target", ["weight", "delta"])
def test_purify_conv1d_against_transposed_reference(fam, tmp_path, target):
    out = tmp_path / "out"
    args = ["purify", "--base", str(fam["base"]), "--out", str(out), "--rho", "0.75", "--target", target]
    for m, c in zip(fam["fts"], fam["covs"]):
        args += ["--model", str(m), "--covariance", str(c)]
    assert main(args) == 0
    base = load_tensors(fam["base"])
    fts = [load_tensors(d) for d in fam["fts"]]
    outs = [load_tensors(out / d.name) for d in fam["fts"]]
    cfs = [CovarianceFile(c) for c in fam["covs"]]
    report = json.loads((out / "pave_rank_report.json").read_text())
    names = [n for n in base if any(n.endswith(f"{layer}.weight") for layer in CONV1D)]
    assert len(names) == 4 and base[next(n for n in names if "attn.c_proj" in n)].shape == (16, 16)
    for name in names:
        b = base[name].double().T  # out x in
        mats = [ft[name].double().T - (b if target == "delta" else 0) for ft in fts]
        covs = [cf.get(name).double() for cf in cfs]
        rs = ranks(mats, covs, 0.75)
        for i, (m, c, r) in enumerate(zip(mats, covs, rs)):
            ref = (eq5(m, c, r) + (b if target == "delta" else 0)).T
            assert outs[i][name].shape == fts[i][name].shape
            torch.testing.assert_close(outs[i][name].double(), ref, rtol=1e-5, atol=2e-6, msg=name)
            record = report["tensors"][name]["models"][fam["fts"][i].name]
            assert record["rank"] == r < min(b.shape) and record["damping"] == 0.0


def test_mergekit_pave_on_gpt2(fam, tmp_path):
    """Stock `mergekit-yaml` with `pave` (inner task_arithmetic) on GPT-2's own architecture file:
    base + lambda * sum_i (eq. 6 on W_i^T, transposed back - W_base) for every Conv1D weight."""
    models = "\n".join(f"  - model: {m}\n    parameters: {{weight: 1.0, covariance: {c}}}"
                       for m, c in zip(fam["fts"], fam["covs"]))
    config = (f"merge_method: pave\nbase_model: {fam['base']}\nmodels:\n{models}\n"
              "parameters:\n  inner: task_arithmetic\n  lambda: 0.7\n  rho: 0.75\ndtype: float32\n")
    out = tmp_path / "merged"
    proc = run_mergekit_yaml(config, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = load_tensors(out)
    base = load_tensors(fam["base"])
    fts = [load_tensors(d) for d in fam["fts"]]
    cfs = [CovarianceFile(c) for c in fam["covs"]]
    for name in (n for n in base if any(n.endswith(f"{layer}.weight") for layer in CONV1D)):
        b = base[name].double().T
        mats = [ft[name].double().T for ft in fts]
        covs = [cf.get(name).double() for cf in cfs]
        rs = ranks(mats, covs, 0.75)
        ref = b + 0.7 * sum(eq5(m, c, r) - b for m, c, r in zip(mats, covs, rs))
        torch.testing.assert_close(merged[name].double(), ref.T, rtol=1e-5, atol=2e-6, msg=name)


def test_engine_refuses_files_that_disagree_on_the_layout(tmp_path):
    from pave_plugins.engine import PaveEngine, PaveSettings
    from pave_plugins.io.covariance import CovarianceMetadata, save_covariances

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    files = [
        CovarianceFile(save_covariances(
            tmp_path / f"{layout}.safetensors", {"cov.0": x.T @ x},
            CovarianceMetadata(layer_map={"fc": "cov.0"}, extra={"layers": {"fc": {"weight_layout": layout}}}),
        ))
        for layout in ("in_out", "out_in")
    ]
    w = torch.randn(6, 6, generator=g, dtype=torch.float64)
    engine = PaveEngine(PaveSettings(), files, ["a", "b"])
    with pytest.raises(ValueError, match=r"^fc.weight: the covariance files disagree on its weight layout"):
        engine.step("fc.weight", w, [w + 0.1, w - 0.1])

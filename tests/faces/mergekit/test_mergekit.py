"""mergekit integration: the stock ``mergekit-yaml`` runs ``pave`` and ``tsv`` on tiny local models.

Few subprocess merges (module-scoped fixtures); further merges run in-process through mergekit's
own ``run_merge``. Every merged weight is compared with an independent computation: a dense
float64 purification with an explicit inverse, mergekit's stock methods on checkpoints written by
``pave purify``, and FusionBench's TSV-M implementation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from independent_reference import ranks as independent_ranks
from mergekit_helpers import build_family, load_tensors, run_mergekit_yaml, write_covariances
from safetensors.torch import load_file

from pave_plugins.io.covariance import CovarianceFile
from mergekit_helpers import run_inprocess

RHO = 0.875


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base, fts = build_family("llama", root, n_models=2)
    covs = [write_covariances(d, root / f"cov{i}.safetensors", seed=10 + i) for i, d in enumerate(fts)]
    return {"root": root, "base": base, "fts": fts, "covs": covs}


def pave_yaml(fam, inner="ties", extra="", weights=(1.0, 0.7), covs=None, dtype="float32", rho=RHO):
    covs = fam["covs"] if covs is None else covs
    models = "\n".join(
        f"  - model: {ft}\n    parameters: {{weight: {w}, covariance: {c}}}"
        for ft, w, c in zip(fam["fts"], weights, covs)
    )
    return (
        f"merge_method: pave\nbase_model: {fam['base']}\nmodels:\n{models}\n"
        f"parameters:\n  inner: {inner}\n  rho: {rho}\n{extra}dtype: {dtype}\n"
    )


def stock_yaml(method, base, models, weights=(1.0, 0.7), extra="", dtype="float32"):
    ms = "\n".join(f"  - model: {m}\n    parameters: {{weight: {w}}}" for m, w in zip(models, weights))
    params = f"parameters:\n{extra}" if extra else ""
    return f"merge_method: {method}\nbase_model: {base}\nmodels:\n{ms}\n{params}dtype: {dtype}\n"


TIES_EXTRA = "  lambda: 0.9\n  density: 0.5\n"


@pytest.fixture(scope="module")
def purified(llama):
    """``pave purify`` (in-process CLI) of the two Llama fine-tunes."""
    from pave_plugins.cli import main

    out = llama["root"] / "purified"
    argv = ["purify", "--base", str(llama["base"])]
    for m, c in zip(llama["fts"], llama["covs"]):
        argv += ["--model", str(m), "--covariance", str(c)]
    assert main(argv + ["--rho", str(RHO), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def subprocess_merges(llama, purified):
    """The two real ``mergekit-yaml`` runs on Llama: pave(inner=ties) and stock ties on purified."""
    root = llama["root"]
    out_pave = root / "merged_pave_ties"
    r1 = run_mergekit_yaml(pave_yaml(llama, "ties", TIES_EXTRA), out_pave, "-v")
    assert r1.returncode == 0, r1.stderr[-3000:]
    out_stock = root / "merged_stock_ties"
    pur = [purified / ft.name for ft in llama["fts"]]
    r2 = run_mergekit_yaml(stock_yaml("ties", llama["base"], pur, extra=TIES_EXTRA), out_stock)
    assert r2.returncode == 0, r2.stderr[-3000:]
    return {"pave": out_pave, "stock": out_stock, "log": r1.stderr}




# --------------------------------------------------------------------------------------------
# independent references
# --------------------------------------------------------------------------------------------
def dense_purified_weight(w_ft: torch.Tensor, c: torch.Tensor, rank: int) -> torch.Tensor:
    """PAVE eq. 5 literally, float64 and an explicit inverse: SVD_r(W_ft C) C^{-1}."""
    w, c = w_ft.double(), c.double()
    u, s, vh = torch.linalg.svd(w @ c, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(c)


def reference_ranks(w_fts, covs, rho):
    """Algorithm 1 transcribed line by line, on the singular values of W_ft C."""
    return independent_ranks(w_fts, covs, rho)


# --------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------
def test_stock_mergekit_finds_methods_and_opt_out(tmp_path):
    """Fresh processes of the stock ``mergekit-yaml`` find the methods (the merges below); the
    opt-out variable removes them."""
    import os
    import subprocess
    import sys

    from mergekit.merge_methods import registry

    names = {m.spec.name for m in registry.registered_methods()}
    assert {"pave", "tsv", "ties"} <= names
    code = "import mergekit.merge_methods as m; print(sorted(x.spec.name for x in m.registered_methods()))"
    env = dict(os.environ, PAVE_PLUGINS_DISABLE="1")
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert "'pave'" not in off.stdout and "'tsv'" not in off.stdout and "'ties'" in off.stdout
    # importing our module first (it imports mergekit, which loads the plugins half-way through
    # that import) still registers both methods, with no warning
    first = subprocess.run(
        [sys.executable, "-c", "import pave_plugins.mergekit.pave; " + code], capture_output=True, text=True, check=True
    )
    assert "'pave'" in first.stdout and "'tsv'" in first.stdout
    assert "not registered" not in first.stderr and "failed" not in first.stderr


def test_startup_imports_only_the_finder():
    """The .pth bootstrap runs at every interpreter start: beyond what ``site`` itself imports, it
    may add only its own module and standard-library modules (no torch, no mergekit, nothing else
    third-party). Start-up cost is a benchmark figure, not a timed test."""
    import subprocess
    import sys

    def started(*flags: str) -> set[str]:
        r = subprocess.run([sys.executable, *flags, "-X", "importtime", "-c", "pass"], capture_output=True, text=True,
                           check=True)
        return {ln.rsplit("|", 1)[1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}

    with_site, without_site = started(), started("-S")
    assert "pave_plugins._mergekit_bootstrap" in with_site, "the .pth bootstrap was not imported at start-up"
    extra = with_site - without_site
    third_party = sorted(m for m in extra if m.split(".")[0] not in sys.stdlib_module_names
                         and not m.startswith("pave_plugins")
                         and m not in ("_distutils_hack", "sitecustomize", "usercustomize"))  # site's own hooks
    assert not third_party, third_party


def test_plugin_errors_warn_and_never_override(caplog):
    from importlib.metadata import EntryPoint

    from mergekit.merge_methods import registry

    from pave_plugins._mergekit_bootstrap import register_entry_points

    before = {m.spec.name: m for m in registry.registered_methods()}
    eps = [
        EntryPoint("broken", "pave_plugins_no_such_module:x", "mergekit.merge_methods"),
        EntryPoint("clash", "mergekit_helpers:clashing_method", "mergekit.merge_methods"),
        EntryPoint("notamethod", "os:sep", "mergekit.merge_methods"),
    ]
    with caplog.at_level("WARNING", logger="pave_plugins.mergekit"):
        assert register_entry_points(eps, registry) == []
    text = caplog.text
    assert "broken" in text and "failed to load" in text
    assert "'linear'" in text and "already has a method" in text
    assert "notamethod" in text
    after = {m.spec.name: m for m in registry.registered_methods()}
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


# --------------------------------------------------------------------------------------------
# pave with the stock CLI
# --------------------------------------------------------------------------------------------
def test_pave_ties_equals_stock_ties_on_purified_checkpoints(subprocess_merges):
    a = load_tensors(subprocess_merges["pave"])
    b = load_tensors(subprocess_merges["stock"])
    assert a.keys() == b.keys() and len(a) == 21
    for k in a:
        assert a[k].dtype == torch.float32
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_purified_checkpoints_match_dense_reference(llama, purified):
    """``pave purify`` output: eq. 5 with explicit inverse, ranks of Algorithm 1, loadable by transformers."""
    from transformers import AutoModelForCausalLM

    base = load_tensors(llama["base"])
    fts = [load_tensors(d) for d in llama["fts"]]
    cfs = [CovarianceFile(c) for c in llama["covs"]]
    outs = [load_tensors(purified / d.name) for d in llama["fts"]]
    report = json.loads((purified / "pave_rank_report.json").read_text())
    n_purified = 0
    for name in base:
        covs = [cf.get(name) if name in cf else None for cf in cfs]
        if covs[0] is None:
            for ft, out in zip(fts, outs):
                torch.testing.assert_close(out[name], ft[name], rtol=0, atol=0)
            continue
        n_purified += 1
        ranks = reference_ranks([ft[name] for ft in fts], covs, RHO)
        for i, (ft, out) in enumerate(zip(fts, outs)):
            ref = dense_purified_weight(ft[name], covs[i], ranks[i])
            torch.testing.assert_close(out[name].double(), ref, rtol=1e-5, atol=2e-6, msg=name)
            rec = report["tensors"][name]["models"][llama["fts"][i].name]
            assert rec["rank"] == ranks[i] and rec["full_rank"] == min(ft[name].shape)
    assert n_purified == 14
    model = AutoModelForCausalLM.from_pretrained(purified / llama["fts"][0].name)
    sd = model.state_dict()
    torch.testing.assert_close(sd["model.layers.0.self_attn.q_proj.weight"], outs[0]["model.layers.0.self_attn.q_proj.weight"])


def test_rank_report_and_model_card(llama, subprocess_merges):
    out = subprocess_merges["pave"]
    rep = json.loads((out / "pave_rank_report.json").read_text())
    assert rep["complete"] and rep["settings"]["inner"] == "ties" and rep["settings"]["rho"] == RHO
    assert rep["n_purified"] == 14 and rep["n_tensors"] == 21
    assert "model.embed_tokens.weight" in rep["plain_task_vector"] and "lm_head.weight" in rep["plain_task_vector"]
    # rho_i (Algorithm 1 line 15) recomputed from the per-tensor records
    for m in (p.name for p in llama["fts"]):
        kept = sum(t["models"][m]["rank"] for t in rep["tensors"].values() if t["purified"])
        full = sum(t["models"][m]["full_rank"] for t in rep["tensors"].values() if t["purified"])
        assert rep["model_ratios"][m] == pytest.approx(kept / full)
    rec = rep["tensors"]["model.layers.1.mlp.down_proj.weight"]["models"][llama["fts"][1].name]
    assert {"rank", "full_rank", "damping", "relative_change", "pruning_error"} <= rec.keys()
    assert rec["relative_change"] > 0
    # the log names purified tensors and summarises
    assert "pave: purified model.layers.0.self_attn.q_proj.weight" in subprocess_merges["log"]
    assert "rho_i=" in subprocess_merges["log"]
    card = (out / "README.md").read_text()
    assert "[PAVE" in card and "https://arxiv.org/abs/2510.14697" in card
    assert "merge_method: pave" in card and "inner: ties" in card


def test_pave_task_arithmetic_matches_dense_formula(llama, tmp_path):
    """PAVE+TA: base + lambda * sum_i w_i (SVD_r(W_i C_i) C_i^{-1} - W_base), plain TV elsewhere."""
    from pave_plugins.mergekit import pave_merge_method

    store = pave_merge_method.store
    out = run_inprocess(pave_yaml(llama, "task_arithmetic", "  lambda: 0.8\n"), tmp_path / "ta")
    # q/k/v and gate/up share a covariance: one damping check per distinct covariance and model
    n_keys = len(set(CovarianceFile(llama["covs"][0]).metadata.layer_map.values()))
    assert store.n_prepared >= 2 * n_keys
    merged = load_tensors(out)
    base = load_tensors(llama["base"])
    fts = [load_tensors(d) for d in llama["fts"]]
    cfs = [CovarianceFile(c) for c in llama["covs"]]
    weights = (1.0, 0.7)
    for name, b in base.items():
        if name in cfs[0]:
            covs = [cf.get(name) for cf in cfs]
            ranks = reference_ranks([ft[name] for ft in fts], covs, RHO)
            tvs = [dense_purified_weight(ft[name], c, r) - b.double() for ft, c, r in zip(fts, covs, ranks)]
        else:
            tvs = [ft[name].double() - b.double() for ft in fts]
        ref = b.double() + 0.8 * sum(w * t for w, t in zip(weights, tvs))
        torch.testing.assert_close(merged[name].double(), ref, rtol=1e-5, atol=2e-6, msg=name)


def test_prepared_covariance_cache_is_shared(llama, tmp_path):
    from pave_plugins.mergekit import pave_merge_method

    store = pave_merge_method.store
    start = store.n_prepared
    run_inprocess(pave_yaml(llama, "task_arithmetic"), tmp_path / "cache")
    n_keys = len(set(CovarianceFile(llama["covs"][0]).metadata.layer_map.values()))
    assert store.n_prepared - start == 2 * n_keys  # 8 covariances x 2 models, not 14 x 2


def test_pave_dare_ties_equals_stock_under_fixed_seed(llama, purified, tmp_path):
    extra = "  density: 0.6\n"
    pave_out = run_inprocess(pave_yaml(llama, "dare_ties", extra), tmp_path / "pave_dare", seed=123)
    pur = [purified / ft.name for ft in llama["fts"]]
    stock_out = run_inprocess(stock_yaml("dare_ties", llama["base"], pur, extra=extra), tmp_path / "dare", seed=123)
    other = run_inprocess(pave_yaml(llama, "dare_ties", extra), tmp_path / "pave_dare2", seed=7)
    a, b, c = load_tensors(pave_out), load_tensors(stock_out), load_tensors(other)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # DARE is random: another seed differs


def test_bf16_merge_upcasts_and_casts_back(llama, tmp_path):
    out32 = load_tensors(run_inprocess(pave_yaml(llama, "task_arithmetic"), tmp_path / "f32"))
    out16 = load_tensors(run_inprocess(pave_yaml(llama, "task_arithmetic", dtype="bfloat16"), tmp_path / "bf16"))
    for k, v in out16.items():
        assert v.dtype == torch.bfloat16
        torch.testing.assert_close(v.float(), out32[k], rtol=2e-2, atol=2e-2, msg=k)


# --------------------------------------------------------------------------------------------
# TSV-M on BERT
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    base, fts = build_family("bert", root, n_models=3, seed=3)
    covs = [
        write_covariances(d, root / f"cov{i}.safetensors", seed=20 + i, strip_prefix="bert." if i == 0 else "")
        for i, d in enumerate(fts)
    ]
    return {"root": root, "base": base, "fts": fts, "covs": covs}


def test_tsv_bert_matches_fusionbench(bert):
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction

    out = bert["root"] / "tsv"
    cfg = stock_yaml("tsv", bert["base"], bert["fts"], weights=(1, 1, 1), extra="  alpha: 0.8\n")
    r = run_mergekit_yaml(cfg.replace("    parameters: {weight: 1}\n", ""), out)
    assert r.returncode == 0, r.stderr[-3000:]
    merged = load_tensors(out)
    base = load_tensors(bert["base"])
    tvs = [{k: v - base[k] for k, v in load_tensors(d).items() if v.is_floating_point()} for d in bert["fts"]]
    ref = compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu")
    for k, b in base.items():
        if not b.is_floating_point():
            continue
        torch.testing.assert_close(merged[k], b + 0.8 * ref[k], rtol=1e-4, atol=1e-5, msg=k)
    card = (out / "README.md").read_text()
    assert "[TSV-M" in card and "https://arxiv.org/abs/2412.00081" in card


def test_pave_inner_tsv_on_bert_equals_tsv_on_purified(bert, tmp_path):
    """BERT classifier; one covariance file named without the ``bert.`` prefix; pave(inner=tsv) == tsv on purified."""
    from pave_plugins.cli.purify import purify_checkpoints

    purified = purify_checkpoints(bert["base"], bert["fts"], bert["covs"], tmp_path / "pur", rho=RHO)
    pave_cfg = pave_yaml(bert, "tsv", "  alpha: 0.8\n", weights=(1, 1, 1))
    a = load_tensors(run_inprocess(pave_cfg, tmp_path / "pave_tsv"))
    pur = [purified / d.name for d in bert["fts"]]
    tsv_cfg = stock_yaml("tsv", bert["base"], pur, weights=(1, 1, 1), extra="  alpha: 0.8\n")
    b = load_tensors(run_inprocess(tsv_cfg.replace("    parameters: {weight: 1}\n", ""), tmp_path / "tsv"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    rep = json.loads((tmp_path / "pave_tsv" / "pave_rank_report.json").read_text())
    q = rep["tensors"]["bert.encoder.layer.0.attention.self.query.weight"]
    assert q["purified"] and all(m["purified"] for m in q["models"].values())
    assert not rep["tensors"]["bert.embeddings.word_embeddings.weight"]["purified"]
    assert not rep["tensors"]["classifier.weight"]["purified"]


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
def test_missing_covariance_file(llama, tmp_path):
    missing = tmp_path / "nope.safetensors"
    cfg = pave_yaml(llama, covs=[llama["covs"][0], missing])
    with pytest.raises(Exception, match=re.escape(f"covariance file not found: {missing}")):
        run_inprocess(cfg, tmp_path / "out")


def test_covariance_of_wrong_shape(llama, tmp_path):
    """Same layer names, wrong width: the error names the tensor, the model and the file."""
    bad = tmp_path / "bad.safetensors"
    cf = CovarianceFile(llama["covs"][1])
    from pave_plugins.io.covariance import CovarianceMetadata, save_covariances

    covs = {}
    for key in set(cf.metadata.layer_map.values()):
        x = torch.randn(60, 20, dtype=torch.float64)
        covs[key] = x.T @ x
    save_covariances(bad, covs, CovarianceMetadata(layer_map=cf.metadata.layer_map))
    with pytest.raises(ValueError) as err:
        run_inprocess(pave_yaml(llama, covs=[llama["covs"][0], bad]), tmp_path / "out")
    msg = str(err.value)
    assert str(bad) in msg and "is 20 x 20" in msg and "another model" in msg and str(llama["fts"][1]) in msg


def test_covariance_for_another_model(llama, bert, tmp_path):
    with pytest.raises(ValueError, match=r"layer\(s\) of the file are not in the model.*another model \(model .*llama_ft1"):
        run_inprocess(pave_yaml(llama, covs=[llama["covs"][0], bert["covs"][0]]), tmp_path / "out")


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"inner": "nosuchmethod"}, r"unknown inner method 'nosuchmethod' for pave; choose one of: .*ties"),
        ({"rho": 0.0}, r"rho \(preserved rank ratio\) must be in \(0, 1\], got 0.0"),
        ({"rho": 1.5}, r"rho \(preserved rank ratio\) must be in \(0, 1\], got 1.5"),
        ({"extra": "  gamma: 0.95\n"}, r"gamma \(stopping ratio\) must be smaller than rho"),
    ],
)
def test_bad_parameters(llama, tmp_path, kwargs, pattern):
    with pytest.raises(Exception, match=pattern):
        run_inprocess(pave_yaml(llama, **kwargs), tmp_path / "out")


def test_purify_cli_bad_input(llama, purified, tmp_path):
    from pave_plugins.cli import main

    args = ["purify", "--base", str(llama["base"]), "--model", str(llama["fts"][0])]
    # one covariance per model
    assert main(args + ["--model", str(llama["fts"][1]), "--covariance", str(llama["covs"][0]), "--out", str(tmp_path / "o")]) == 2
    # an existing output is refused (and left as it was)
    before = sorted(p.name for p in purified.iterdir())
    assert main(args + ["--covariance", str(llama["covs"][0]), "--out", str(purified)]) == 2
    assert sorted(p.name for p in purified.iterdir()) == before
    assert main(args + ["--covariance", str(llama["covs"][0]), "--rho", "1.2", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
    weights = load_file(str(purified / llama["fts"][0].name / "model.safetensors"))
    assert len(weights) == 21


# --------------------------------------------------------------------------------------------
# shipped recipes
# --------------------------------------------------------------------------------------------
CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "mergekit"


@pytest.mark.parametrize("recipe", ["pave_ta.yaml", "pave_ties.yaml", "pave_dare.yaml", "tsv_m.yaml"])
def test_shipped_recipes_run(llama, tmp_path, recipe):
    text = (CONFIGS / recipe).read_text()
    for placeholder, real in [
        ("/models/base", llama["base"]),
        ("/models/ft_task_a", llama["fts"][0]),
        ("/models/ft_task_b", llama["fts"][1]),
        ("/covs/task_a.safetensors", llama["covs"][0]),
        ("/covs/task_b.safetensors", llama["covs"][1]),
    ]:
        assert placeholder in text or (recipe == "tsv_m.yaml" and placeholder.startswith("/covs"))
        text = text.replace(placeholder, str(real))
    out = run_inprocess(text, tmp_path / "out", seed=0)
    assert len(load_tensors(out)) == 21
    assert (out / "pave_rank_report.json").exists() == recipe.startswith("pave")


def test_tsv_exclude_filter_gives_mean_task_vector(llama, tmp_path):
    extra = "  alpha: 0.5\n  exclude:\n    - filter: embed_tokens\n      value: true\n    - value: false\n"
    cfg = stock_yaml("tsv", llama["base"], llama["fts"], extra=extra).replace("    parameters: {weight: 1.0}\n", "")
    cfg = cfg.replace("    parameters: {weight: 0.7}\n", "")
    merged = load_tensors(run_inprocess(cfg, tmp_path / "tsv"))
    base = load_tensors(llama["base"])
    fts = [load_tensors(d) for d in llama["fts"]]
    name = "model.embed_tokens.weight"
    mean = sum(ft[name] - base[name] for ft in fts) / 2
    torch.testing.assert_close(merged[name], base[name] + 0.5 * mean)
    head = "lm_head.weight"  # 2-D, not excluded: TSV-M (not the mean)
    assert not torch.allclose(merged[head], base[head] + 0.5 * sum(ft[head] - base[head] for ft in fts) / 2)


def test_target_delta_uniform_allocation(llama, tmp_path):
    """target=delta, rank_allocation=uniform: SVD_r(dW C) C^{-1} with r = floor(rho R) for every model."""
    extra = "  lambda: 1.0\n  target: delta\n  rank_allocation: uniform\n"
    merged = load_tensors(run_inprocess(pave_yaml(llama, "task_arithmetic", extra, weights=(1.0, 1.0)), tmp_path / "d"))
    base = load_tensors(llama["base"])
    fts = [load_tensors(d) for d in llama["fts"]]
    cfs = [CovarianceFile(c) for c in llama["covs"]]
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        b = base[name].double()
        r = int(RHO * min(b.shape))
        tvs = [dense_purified_weight(ft[name].double() - b, cf.get(name), r) for ft, cf in zip(fts, cfs)]
        torch.testing.assert_close(merged[name].double(), b + sum(tvs), rtol=1e-5, atol=2e-6, msg=name)
    rep = json.loads((tmp_path / "d" / "pave_rank_report.json").read_text())
    assert rep["settings"]["target"] == "delta" and rep["settings"]["rank_allocation"] == "uniform"
    assert all(m["rank"] == int(RHO * m["full_rank"]) for t in rep["tensors"].values() if t["purified"] for m in t["models"].values())

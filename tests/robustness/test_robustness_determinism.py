"""Robustness: the same inputs and seed give bit-identical outputs on CPU.

Each entry point runs twice in one test on the same inputs; every output tensor must be equal bit
for bit (``torch.equal``), not merely close: mergekit ``pave`` + TIES (and + DARE-TIES under
``--random-seed``), ``pave purify``, FusionBench ``pave/pave`` + Task Arithmetic, ``pave rethink``
with a seed, and ``pave collect`` (covariance tensors; the metadata holds timings, so the tensors
are compared, not the file bytes).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergekit_helpers import build_family, write_covariances


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.relative_to(folder)}:{k}"] = v
    return out


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    base, fts = build_family("llama", root, n_models=2)
    covs = [write_covariances(d, root / f"cov{i}.safetensors", seed=30 + i) for i, d in enumerate(fts)]
    return {"root": root, "base": base, "fts": fts, "covs": covs}


def _merge(fam, out: Path, inner: str, extra: str, seed=None) -> Path:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    models = "\n".join(
        f"  - model: {ft}\n    parameters: {{weight: {w}, density: 0.6, covariance: {c}}}"
        for ft, c, w in zip(fam["fts"], fam["covs"], (1.0, 0.7))
    )
    text = (f"merge_method: pave\nbase_model: {fam['base']}\nmodels:\n{models}\n"
            f"parameters:\n  inner: {inner}\n  rho: 0.875\n{extra}dtype: float32\n")
    cfg = MergeConfiguration.model_validate(yaml.safe_load(text))
    run_merge(cfg, str(out), options=MergeOptions(copy_tokenizer=False, quiet=True, random_seed=seed), config_source=text)
    return out


@pytest.mark.parametrize("inner,seed", [("ties", None), ("dare_ties", 7)])
def test_mergekit_pave_twice(llama, tmp_path, inner, seed):
    a = _merge(llama, tmp_path / "a", inner, "  lambda: 0.9\n", seed)
    b = _merge(llama, tmp_path / "b", inner, "  lambda: 0.9\n", seed)
    ta, tb = tensors_of(a), tensors_of(b)
    assert_bit_identical(ta, tb)
    # and the merge did something: PAVE moved the q_proj away from the base
    base = load_file(str(llama["base"] / "model.safetensors"))
    assert not torch.equal(ta["model.safetensors:model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])


def test_pave_purify_twice(llama, tmp_path):
    from pave_plugins.cli.purify import purify_checkpoints

    outs = [purify_checkpoints(llama["base"], llama["fts"], llama["covs"], tmp_path / n, rho=0.875) for n in "ab"]
    assert_bit_identical(tensors_of(outs[0]), tensors_of(outs[1]))


def test_fusion_bench_pave_ta_twice(tmp_path):
    from fusion_bench import BaseModelPool

    from fusion_bench_helpers import covariances_of, inputs_for, pool_dict, save_covariance_file, tiny_models
    from pave_plugins.fusion_bench import PAVEAlgorithm

    base, fts = tiny_models(3)
    files = {n: save_covariance_file(tmp_path / f"{n}.safetensors", covariances_of(m, inputs_for(n))) for n, m in fts.items()}
    ta = {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3}
    runs = [PAVEAlgorithm(inner=ta, rho=0.75, covariances=files).run(BaseModelPool(pool_dict(base, fts))).state_dict()
            for _ in range(2)]
    assert_bit_identical(runs[0], runs[1])


def test_rethink_twice_with_seed(tmp_path):
    from rethink_helpers import build_seq_cls

    from pave_plugins.core.rethink import RethinkConfig
    from pave_plugins.rethink import RethinkJob, run_job

    dirs, calib, _ = build_seq_cls(tmp_path)
    outs = []
    for n in "ab":
        out = tmp_path / f"out_{n}"
        run_job(RethinkJob(base=str(tmp_path / "base"), merged=str(tmp_path / "merged"), calib=calib, out=str(out),
                           heads={t: str(d) for t, d in dirs.items()}, device="cpu",
                           config=RethinkConfig(iterations=2, epochs=3, seed=5, progress=False)))
        outs.append(out)
    ta, tb = tensors_of(outs[0]), tensors_of(outs[1])
    assert_bit_identical(ta, tb)
    # training did change the model (so the comparison is not between two copies of the input)
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert any(not torch.equal(ta[f"model.safetensors:{k}"], v) for k, v in merged.items() if f"model.safetensors:{k}" in ta)


def test_collect_twice(tmp_path):
    from collect_helpers import TEXTS, save_model_dir, tiny_llama, write_jsonl

    from pave_plugins.collect import collect_to_file

    mdir = save_model_dir(tmp_path / "m", tiny_llama())
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS * 3])
    outs = []
    for n in "ab":
        out = tmp_path / f"{n}.safetensors"
        collect_to_file(mdir, data, out, n_samples=16, seed=3, max_length=16, batch_size=4, device="cpu", progress=False)
        outs.append(out)
    got = []
    for out in outs:
        with safe_open(str(out), framework="pt") as f:
            got.append(({k: f.get_tensor(k) for k in f.keys()}, f.metadata()["model_fingerprint"], f.metadata()["layer_map"]))
    assert_bit_identical(got[0][0], got[1][0])
    assert got[0][1:] == got[1][1:]

"""Robustness: a matrix of bad inputs across the package.

Every case runs one of our entry points (``pave purify`` / ``pave collect`` / ``pave rethink``
through their argparse front ends, mergekit's ``run_merge`` with ``pave``, FusionBench
``pave/pave``, core) on a deliberately broken input and asserts

* a specific exception type,
* a readable message naming the file, tensor or layer at fault,
* that no output is left behind: the output path is absent (or byte-for-byte what it was) and no
  temporary sibling remains.

Opt-in switches (``--allow-missing-covariance``, ``--allow-fingerprint-mismatch``,
``--allow-pickle``) and inputs that must work (dtype mixes) are tested after the matrix, against
independent computations.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from pave_plugins.io.covariance import CovarianceFile, CovarianceFileError, MissingCovarianceError, save_covariances
from inputs_helpers import RHO, cli, copy_model, cov_variant, purify_argv, rethink_argv, snapshot, temp_siblings



# --------------------------------------------------------------------------------------------
# fixtures: one tiny Llama family, a collect-ready model folder, a rethink set-up
# --------------------------------------------------------------------------------------------














# --------------------------------------------------------------------------------------------
# the matrix
# --------------------------------------------------------------------------------------------
@dataclass
class Case:
    run: Callable[[], object]
    out: Path | None
    exc: type
    pattern: str  # regular expression the message must match (names the file / tensor / layer)


def _first_linear(env) -> str:
    return "model.layers.0.mlp.down_proj"


def c_cov_shape(env, tmp):
    bad = cov_variant(env, tmp / "narrow.safetensors", lambda k, c: torch.eye(20, dtype=c.dtype) * c.diagonal().mean())
    out = tmp / "out"
    return Case(lambda: cli(purify_argv(env, out, covs=[env["covs"][0], bad])), out, CovarianceFileError,
                rf"{re.escape(str(bad))}: covariance of layer 'model\.layers\.\d+\.\S+' is 20 x 20 but the model's .* takes \d+ input features")


def c_cov_shape_mergekit(env, tmp):
    bad = cov_variant(env, tmp / "narrow.safetensors", lambda k, c: torch.eye(20, dtype=c.dtype))
    out = tmp / "merged"
    return Case(lambda: run_merge(env, out, covs=[env["covs"][0], bad]), out, ValueError,
                rf"{re.escape(str(bad))}: covariance of layer 'model\.layers\.\d+\.\S+' is 20 x 20 but the model's .* takes \d+ input features.*another model \(model .*llama_ft1")


def c_missing_layer(env, tmp):
    bad = cov_variant(env, tmp / "partial.safetensors", lambda k, c: c, drop_layers=("layers.1.mlp.down_proj",))
    out = tmp / "out"
    return Case(lambda: cli(purify_argv(env, out, covs=[env["covs"][0], bad])), out, MissingCovarianceError,
                rf"model\.layers\.1\.mlp\.down_proj\.weight: missing covariance for model\(s\) \['.*llama_ft1 \({re.escape(str(bad))}\)'\].*--allow-missing-covariance")


def c_missing_layer_mergekit(env, tmp):
    bad = cov_variant(env, tmp / "partial.safetensors", lambda k, c: c, drop_layers=("layers.1.mlp.down_proj",))
    out = tmp / "merged"
    return Case(lambda: run_merge(env, out, covs=[env["covs"][0], bad]), out, MissingCovarianceError,
                r"model\.layers\.1\.mlp\.down_proj\.weight: missing covariance .*allow_missing_covariance")


def c_fingerprint(env, tmp):
    from pave_plugins.collect import model_fingerprint

    other = cov_variant(env, tmp / "fp.safetensors", lambda k, c: c, fingerprint=model_fingerprint(str(env["fts"][0])))
    out = tmp / "out"
    return Case(lambda: cli(purify_argv(env, out, covs=[env["covs"][0], other])), out, CovarianceFileError,
                rf"{re.escape(str(other))}: collected on weights with fingerprint sha256:[0-9a-f]+, the model has sha256:[0-9a-f]+.*--allow-fingerprint-mismatch.*llama_ft1")


def c_cov_other_architecture(env, tmp):
    # a covariance file of a BERT used for a Llama model: none of its layers exist
    from pave_plugins.io.covariance import CovarianceMetadata as M

    bert = tmp / "bert.safetensors"
    save_covariances(bert, {"cov.0": torch.eye(32, dtype=torch.float64)},
                     M(layer_map={"bert.encoder.layer.0.attention.self.query": "cov.0",
                                  "bert.encoder.layer.0.attention.self.key": "cov.0"}))
    out = tmp / "out"
    return Case(lambda: cli(purify_argv(env, out, covs=[env["covs"][0], bert])), out, CovarianceFileError,
                rf"{re.escape(str(bert))}: 2 layer\(s\) of the file are not in the model.*another model \(model .*llama_ft1\)")


def _nan_weight(env, tmp, value):
    name = "model.layers.0.self_attn.q_proj.weight"

    def edit(sd):
        sd[name] = sd[name].clone()
        sd[name][1, 2] = value
        return sd

    bad = copy_model(env["fts"][1], tmp / "ft_bad", edit)
    out = tmp / "out"
    return Case(lambda: cli(purify_argv(env, out, models=[env["fts"][0], bad])), out, ValueError,
                rf"{re.escape(name)}: the weight of .*ft_bad contains NaN or Inf")


def c_nan_weight(env, tmp):
    return _nan_weight(env, tmp, float("nan"))


def c_nan_norm(env, tmp):
    # a tensor that is never purified (a norm): still refused
    name = "model.layers.1.post_attention_layernorm.weight"

    def edit(sd):
        sd[name] = sd[name].clone()
        sd[name][0] = float("nan")
        return sd

    bad = copy_model(env["fts"][1], tmp / "ft_bad", edit)
    out = tmp / "out"
    return Case(lambda: cli(purify_argv(env, out, models=[env["fts"][0], bad])), out, ValueError,
                rf"{re.escape(name)}: the weight of .*ft_bad contains NaN or Inf")


def c_inf_weight(env, tmp):
    return _nan_weight(env, tmp, float("inf"))


def _cov_values(env, tmp, change, pattern):
    bad = cov_variant(env, tmp / "bad.safetensors", change)
    out = tmp / "out"
    return Case(lambda: cli(purify_argv(env, out, covs=[env["covs"][0], bad])), out, CovarianceFileError,
                rf"covariance 'cov\.\d+' \(layer 'model\.\S+'\) in {re.escape(str(bad))}: {pattern}")


def c_cov_nan(env, tmp):
    def f(k, c):
        c = c.clone()
        c[0, 0] = float("nan")
        return c
    return _cov_values(env, tmp, f, "contains NaN or Inf")


def c_cov_inf(env, tmp):
    def f(k, c):
        c = c.clone()
        c[3, 1] = c[1, 3] = float("inf")
        return c
    return _cov_values(env, tmp, f, "contains NaN or Inf")


def c_cov_zero(env, tmp):
    return _cov_values(env, tmp, lambda k, c: torch.zeros_like(c), r"is all zero")


def c_cov_negative(env, tmp):
    return _cov_values(env, tmp, lambda k, c: -c, r"has negative diagonal entries")


def c_cov_indefinite(env, tmp):
    # symmetric, positive diagonal, eigenvalues 1 + 5 (n - 1) and -4: not X X^T
    def f(k, c):
        n = c.shape[0]
        return torch.eye(n, dtype=c.dtype) + 5.0 * (torch.ones(n, n, dtype=c.dtype) - torch.eye(n, dtype=c.dtype))
    return _cov_values(env, tmp, f, r"is not positive semi-definite \(smallest eigenvalue -")


def c_cov_asymmetric(env, tmp):
    def f(k, c):
        c = c.clone()
        c[0, 1] += 0.5 * float(c.abs().max())
        return c
    return _cov_values(env, tmp, f, r"is not symmetric")


def c_rank_too_large(env, tmp):
    from pave_plugins.core.purify import purify

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 8, generator=g, dtype=torch.float64)
    x = torch.randn(20, 8, generator=g, dtype=torch.float64)
    return Case(lambda: purify(w0 + 0.1, w0, x.T @ x, rank=7), None, ValueError, r"rank 7 is outside \[1, 6\]")


def c_rank_zero(env, tmp):
    from pave_plugins.core.purify import purify

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 8, generator=g, dtype=torch.float64)
    x = torch.randn(20, 8, generator=g, dtype=torch.float64)
    return Case(lambda: purify(w0 + 0.1, w0, x.T @ x, rank=0), None, ValueError, r"rank 0 is outside \[1, 6\]")


def c_rho_zero(env, tmp):
    out = tmp / "out"
    return Case(lambda: cli(purify_argv(env, out, extra=("--rho", "0"))), out, ValueError,
                r"rho \(preserved rank ratio\) must be in \(0, 1\], got 0.0")


def c_rho_above_one(env, tmp):
    from pave_plugins.fusion_bench import PAVEAlgorithm

    return Case(lambda: PAVEAlgorithm(rho=1.01), None, ValueError, r"PAVE: rho \(preserved rank ratio\) must be in \(0, 1\], got 1.01")


def c_gamma_ge_rho(env, tmp):
    out = tmp / "out"
    return Case(lambda: cli(purify_argv(env, out, extra=("--rho", "0.9", "--gamma", "0.9"))), out, ValueError,
                r"gamma \(stopping ratio\) must be smaller than rho")


def c_other_architecture(env, tmp):
    from mergekit_helpers import build_family as bf

    _, bert_fts = bf("bert", tmp, n_models=1)
    out = tmp / "out"
    return Case(lambda: cli(purify_argv(env, out, models=[env["fts"][0], bert_fts[0]])), out, ValueError,
                r"bert_ft0 does not have the base model's tensors \(missing \[.*\], unexpected \['.*models of different architectures")


def c_missing_tensor(env, tmp):
    name = "model.layers.1.mlp.up_proj.weight"
    bad = copy_model(env["fts"][1], tmp / "ft_bad", lambda sd: {k: v for k, v in sd.items() if k != name})
    out = tmp / "out"
    return Case(lambda: cli(purify_argv(env, out, models=[env["fts"][0], bad])), out, ValueError,
                rf"ft_bad does not have the base model's tensors \(missing \['{re.escape(name)}'\]")


def c_shape_mismatch_tensor(env, tmp):
    name = "model.layers.0.mlp.gate_proj.weight"

    def edit(sd):
        sd[name] = sd[name][:40].clone()
        return sd

    bad = copy_model(env["fts"][1], tmp / "ft_bad", edit)
    out = tmp / "out"
    return Case(lambda: cli(purify_argv(env, out, models=[env["fts"][0], bad])), out, ValueError,
                rf"{re.escape(name)}: .*ft_bad has shape \(40, 32\), base \(48, 32\)")


def _truncated(env, tmp, keep):
    bad = copy_model(env["fts"][1], tmp / "ft_bad")
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: keep(len(data))])
    out = tmp / "out"
    return Case(lambda: cli(purify_argv(env, out, models=[env["fts"][0], bad])), out, ValueError,
                rf"{re.escape(str(f))}: cannot read safetensors checkpoint \(truncated or corrupt\?\)")


def c_truncated_checkpoint(env, tmp):
    return _truncated(env, tmp, lambda n: n // 2)


def c_truncated_checkpoint_header(env, tmp):
    return _truncated(env, tmp, lambda n: 6)


def c_corrupt_covariance(env, tmp):
    bad = tmp / "corrupt.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(100))
    out = tmp / "out"
    return Case(lambda: cli(purify_argv(env, out, covs=[env["covs"][0], bad])), out, CovarianceFileError,
                rf"{re.escape(str(bad))}: cannot read covariance file")


def c_truncated_covariance(env, tmp):
    bad = tmp / "trunc.safetensors"
    data = Path(env["covs"][1]).read_bytes()
    bad.write_bytes(data[: len(data) - 1000])
    out = tmp / "out"
    return Case(lambda: cli(purify_argv(env, out, covs=[env["covs"][0], bad])), out, CovarianceFileError,
                rf"{re.escape(str(bad))}: cannot read covariance file")


def _pickle_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    torch.save(sd, dst / "pytorch_model.bin")
    return dst


def c_pickle_purify(env, tmp):
    pk = _pickle_model(env["fts"][1], tmp / "ft_pickle")
    out = tmp / "out"
    return Case(lambda: cli(purify_argv(env, out, models=[env["fts"][0], pk])), out, FileNotFoundError,
                rf"{re.escape(str(pk))}: no \.safetensors weights \(found \['pytorch_model\.bin'\]: pickle checkpoints are not loaded unless you pass --allow-pickle")


def c_pickle_collect(env, tmp):
    from pave_plugins.io.checkpoints import PickleCheckpointError

    pk = _pickle_model(env["cdir"], tmp / "m_pickle")
    out = tmp / "c.safetensors"
    return Case(lambda: cli(["collect", "--model", str(pk), "--data", str(env["data"]), "--device", "cpu",
                             "--max-length", "16", "--no-progress", "-o", str(out)]), out, PickleCheckpointError,
                rf"{re.escape(str(pk))}: weights are a pickle checkpoint \(\['pytorch_model\.bin'\]\), which is not loaded unless you pass --allow-pickle")


def c_pickle_rethink(env, tmp):
    from pave_plugins.io.checkpoints import PickleCheckpointError

    r = env["rroot"]
    pk = _pickle_model(r / "merged", tmp / "merged_pickle")
    out = tmp / "out"
    return Case(lambda: cli(rethink_argv(env, out, merged=pk)), out, PickleCheckpointError,
                rf"{re.escape(str(pk))}: weights are a pickle checkpoint")




def c_empty_calibration_collect(env, tmp):
    from pave_plugins.collect.data import DataError

    empty = tmp / "empty.jsonl"
    empty.write_text("\n\n")
    out = tmp / "c.safetensors"
    return Case(lambda: cli(["collect", "--model", str(env["cdir"]), "--data", str(empty), "--device", "cpu",
                             "--no-progress", "-o", str(out)]), out, DataError, rf"{re.escape(str(empty))}")


def c_empty_calibration_rethink(env, tmp):
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    out = tmp / "out"
    return Case(lambda: cli(rethink_argv(env, out, calib=[f"sent={empty}"])), out, ValueError,
                rf"calibration file {re.escape(str(empty))} has no records")


def c_labels_missing_ce(env, tmp):
    nolab = tmp / "nolabel.jsonl"
    nolab.write_text("".join(json.dumps({"text": "the cat sat"}) + "\n" for _ in range(4)))
    out = tmp / "out"
    return Case(lambda: cli(rethink_argv(env, out, calib=[f"sent={nolab}"])), out, ValueError,
                rf"calibration file {re.escape(str(nolab))}: row 1 has no field 'label' \(that row has \['text'\]; "
                r"needed by loss=ce")


def c_recipe_covariance_missing(env, tmp):
    missing = tmp / "nope.safetensors"
    out = tmp / "merged"
    return Case(lambda: run_merge(env, out, covs=[env["covs"][0], missing]), out, Exception,
                rf"covariance file not found: {re.escape(str(missing))}")


def c_recipe_fusionbench_missing(env, tmp):
    from fusion_bench import BaseModelPool

    from fusion_bench_helpers import pool_dict, tiny_models
    from pave_plugins.fusion_bench import PAVEAlgorithm

    base, fts = tiny_models(2)
    missing = tmp / "task1.safetensors"
    files = {"task0": str(missing).replace("task1", "task0"), "task1": str(missing)}
    return Case(lambda: PAVEAlgorithm(covariances=files).run(BaseModelPool(pool_dict(base, fts))), None, ValueError,
                rf"PAVE: missing covariance for model 'task0': file not found: {re.escape(files['task0'])}")


def c_calib_file_missing(env, tmp):
    missing = tmp / "nope.jsonl"
    out = tmp / "out"
    return Case(lambda: cli(rethink_argv(env, out, calib=[f"sent={missing}"])), out, FileNotFoundError,
                rf"calibration file not found: {re.escape(str(missing))}")


def _blocker(tmp) -> Path:
    f = tmp / "a_file"
    f.write_text("not a folder")
    return f


def c_unwritable_purify(env, tmp):
    out = _blocker(tmp) / "out"
    return Case(lambda: cli(purify_argv(env, out)), out, PermissionError,
                rf"cannot write {re.escape(str(out))}.*{re.escape(str(tmp / 'a_file'))} is not a directory")


def c_unwritable_collect(env, tmp):
    out = _blocker(tmp) / "c.safetensors"
    return Case(lambda: cli(["collect", "--model", str(env["cdir"]), "--data", str(env["data"]), "--device", "cpu",
                             "--no-progress", "-o", str(out)]), out, PermissionError,
                rf"cannot write {re.escape(str(out))}")


def c_unwritable_rethink(env, tmp):
    out = _blocker(tmp) / "out"
    return Case(lambda: cli(rethink_argv(env, out)), out, PermissionError, rf"cannot write {re.escape(str(out))}")


def _existing_model(tmp) -> Path:
    out = tmp / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"old model")
    return out


def c_existing_purify(env, tmp):
    out = _existing_model(tmp)
    return Case(lambda: cli(purify_argv(env, out)), out, FileExistsError,
                rf"{re.escape(str(out))} already exists and is not empty \(pass (--)?overwrite")  # pave's main names the flag


def c_existing_rethink(env, tmp):
    out = _existing_model(tmp)
    return Case(lambda: cli(rethink_argv(env, out)), out, FileExistsError,
                rf"{re.escape(str(out))} already exists and is not empty \(pass (--)?overwrite")


def c_existing_collect(env, tmp):
    out = tmp / "c.safetensors"
    out.write_bytes(b"old covariances")
    return Case(lambda: cli(["collect", "--model", str(env["cdir"]), "--data", str(env["data"]), "--device", "cpu",
                             "--no-progress", "-o", str(out)]), out, FileExistsError,
                rf"{re.escape(str(out))} exists \(pass (--)?overwrite")


CASES = {
    "covariance shape != weight (purify)": c_cov_shape,
    "covariance shape != weight (mergekit pave)": c_cov_shape_mergekit,
    "missing covariance for a layer (purify)": c_missing_layer,
    "missing covariance for a layer (mergekit pave)": c_missing_layer_mergekit,
    "covariance of another model: fingerprint": c_fingerprint,
    "covariance of another architecture": c_cov_other_architecture,
    "NaN in a weight": c_nan_weight,
    "Inf in a weight": c_inf_weight,
    "NaN in a norm weight (not purified)": c_nan_norm,
    "NaN in a covariance": c_cov_nan,
    "Inf in a covariance": c_cov_inf,
    "all-zero covariance": c_cov_zero,
    "negative covariance": c_cov_negative,
    "indefinite covariance": c_cov_indefinite,
    "non-symmetric covariance": c_cov_asymmetric,
    "rank > full rank": c_rank_too_large,
    "rank 0": c_rank_zero,
    "rho = 0": c_rho_zero,
    "rho > 1 (FusionBench)": c_rho_above_one,
    "gamma >= rho": c_gamma_ge_rho,
    "different architectures": c_other_architecture,
    "missing tensor": c_missing_tensor,
    "tensor of another shape": c_shape_mismatch_tensor,
    "truncated safetensors checkpoint": c_truncated_checkpoint,
    "truncated safetensors header": c_truncated_checkpoint_header,
    "corrupt covariance file": c_corrupt_covariance,
    "truncated covariance file": c_truncated_covariance,
    "pickle checkpoint (purify)": c_pickle_purify,
    "pickle checkpoint (collect)": c_pickle_collect,
    "pickle checkpoint (rethink)": c_pickle_rethink,
    "empty calibration data (collect)": c_empty_calibration_collect,
    "empty calibration data (rethink)": c_empty_calibration_rethink,
    "labels missing for CE": c_labels_missing_ce,
    "recipe covariance path missing (mergekit)": c_recipe_covariance_missing,
    "covariance path missing (FusionBench)": c_recipe_fusionbench_missing,
    "calibration path missing (rethink)": c_calib_file_missing,
    "unwritable output (purify)": c_unwritable_purify,
    "unwritable output (collect)": c_unwritable_collect,
    "unwritable output (rethink)": c_unwritable_rethink,
    "output holds a model (purify)": c_existing_purify,
    "output holds a model (rethink)": c_existing_rethink,
    "output file exists (collect)": c_existing_collect,
}


def pave_yaml(env, covs, extra: str = "") -> str:
    models = "\n".join(
        f"  - model: {ft}\n    parameters: {{weight: 1.0, covariance: {c}}}" for ft, c in zip(env["fts"], covs)
    )
    return (f"merge_method: pave\nbase_model: {env['base']}\nmodels:\n{models}\n"
            f"parameters:\n  inner: task_arithmetic\n  rho: {RHO}\n{extra}dtype: float32\n")


def run_merge(env, out: Path, covs, extra: str = "", seed: int | None = None) -> Path:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mk_run
    from mergekit.options import MergeOptions

    text = pave_yaml(env, covs, extra)
    cfg = MergeConfiguration.model_validate(yaml.safe_load(text))
    mk_run(cfg, str(out), options=MergeOptions(copy_tokenizer=False, quiet=True, random_seed=seed), config_source=text)
    return out


def test_matrix_has_at_least_20_cases():
    assert len(CASES) >= 20


@pytest.mark.parametrize("key", list(CASES))
def test_bad_input(env, tmp_path, key):
    case = CASES[key](env, tmp_path)
    before = snapshot(case.out) if case.out is not None else None
    with pytest.raises(case.exc) as err:
        case.run()
    msg = str(err.value)
    assert re.search(case.pattern, msg, flags=re.S), f"{key}: message does not match:\n{msg}\npattern: {case.pattern}"
    if case.out is not None:
        if key.startswith("recipe covariance") or "mergekit" in key:
            # mergekit creates its output folder itself; nothing of ours may be in it
            assert before is None and (not case.out.exists() or not any(case.out.rglob("*.safetensors")))
        else:
            assert snapshot(case.out) == before, f"{key}: output changed"
        assert temp_siblings(case.out) == [], f"{key}: temporary files left behind"


# --------------------------------------------------------------------------------------------
# opt-in switches and inputs that must work
# --------------------------------------------------------------------------------------------
def test_allow_missing_covariance_keeps_plain_task_vector(env, tmp_path):
    """With the option, the model lacking a covariance for one layer keeps its fine-tuned weight there;
    the other model is purified with rank from Algorithm 1 run on itself alone (K = 1)."""
    from independent_reference import eq5
    from independent_reference import ranks as independent_ranks

    layer = "model.layers.1.mlp.down_proj"
    bad = cov_variant(env, tmp_path / "partial.safetensors", lambda k, c: c, drop_layers=(layer,))
    out = tmp_path / "out"
    assert cli(purify_argv(env, out, covs=[env["covs"][0], bad], extra=("--allow-missing-covariance",))) == 0
    name = layer + ".weight"
    w1 = load_file(str(out / env["fts"][1].name / "model.safetensors"))[name]
    ft1 = load_file(str(env["fts"][1] / "model.safetensors"))[name]
    assert torch.equal(w1, ft1)
    w0 = load_file(str(out / env["fts"][0].name / "model.safetensors"))[name]
    ft0 = load_file(str(env["fts"][0] / "model.safetensors"))[name]
    c0 = CovarianceFile(env["covs"][0]).get(layer)
    (r,) = independent_ranks([ft0], [c0], RHO)  # Algorithm 1 on model 0 alone
    ref = eq5(ft0, c0, r).float()
    assert r < min(ft0.shape) and torch.allclose(w0, ref, atol=1e-6)
    rep = json.loads((out / "pave_rank_report.json").read_text())
    assert rep["tensors"][name]["models"][env["fts"][1].name]["purified"] is False

    # mergekit pave: the same option in a recipe
    merged = run_merge(env, tmp_path / "merged", [env["covs"][0], bad], extra="  allow_missing_covariance: true\n")
    assert (merged / "model.safetensors").is_file() or any(merged.glob("*.safetensors"))


def test_allow_missing_covariance_fusion_bench(tmp_path):
    from fusion_bench import BaseModelPool

    from fusion_bench_helpers import covariances_of, inputs_for, pool_dict, save_covariance_file, tiny_models
    from pave_plugins.fusion_bench import PAVEAlgorithm

    base, fts = tiny_models(2)
    covs = {n: covariances_of(m, inputs_for(n)) for n, m in fts.items()}
    files = {n: save_covariance_file(tmp_path / f"{n}.safetensors", c) for n, c in covs.items()}
    partial = dict(covs["task1"])
    del partial["fc2"]
    files["task1"] = save_covariance_file(tmp_path / "t1.safetensors", partial)
    ta = {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 1.0}
    with pytest.raises(ValueError, match=r"fc2.weight: missing covariance for model\(s\) \['task1 .*allow_missing_covariance"):
        PAVEAlgorithm(inner=ta, rho=0.75, covariances=files).run(BaseModelPool(pool_dict(base, fts)))
    merged = PAVEAlgorithm(inner=ta, rho=0.75, covariances=files, allow_missing_covariance=True).run(
        BaseModelPool(pool_dict(base, fts)))
    # independent: fc2 = base + (purified task0 alone, K=1, eq. 5 and Algorithm 1) + plain task1
    from independent_reference import purified_weights

    w0 = base.fc2.weight.detach()
    (p0,) = purified_weights(w0, [fts["task0"].fc2.weight.detach()], [covs["task0"]["fc2"]], 0.75)
    expect = p0.float() + (fts["task1"].fc2.weight.detach() - w0)
    assert torch.allclose(merged.fc2.weight.detach(), expect, atol=1e-5)


def test_allow_fingerprint_mismatch_warns(env, tmp_path, caplog):
    from pave_plugins.collect import model_fingerprint

    other = cov_variant(env, tmp_path / "fp.safetensors", lambda k, c: c, fingerprint=model_fingerprint(str(env["fts"][0])))
    same = cov_variant(env, tmp_path / "fp1.safetensors", lambda k, c: c, fingerprint=model_fingerprint(str(env["fts"][1])))
    # the right fingerprint passes silently; the wrong one with the opt-out gives the same result
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli(purify_argv(env, a, covs=[env["covs"][0], same])) == 0
    with caplog.at_level("WARNING"):
        assert cli(purify_argv(env, b, covs=[env["covs"][0], other], extra=("--allow-fingerprint-mismatch",))) == 0
    assert "fingerprint" in caplog.text and str(other) in caplog.text
    for m in env["fts"]:
        assert load_file(str(a / m.name / "model.safetensors")).keys() == load_file(str(b / m.name / "model.safetensors")).keys()
        for k, v in load_file(str(a / m.name / "model.safetensors")).items():
            assert torch.equal(v, load_file(str(b / m.name / "model.safetensors"))[k])


def test_allow_pickle_gives_the_safetensors_result(env, tmp_path):
    pk = _pickle_model(env["fts"][1], tmp_path / "ft_pickle")
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli(purify_argv(env, a)) == 0
    assert cli(purify_argv(env, b, models=[env["fts"][0], pk], extra=("--allow-pickle",))) == 0
    wa = load_file(str(a / env["fts"][1].name / "model.safetensors"))
    wb = load_file(str(b / "ft_pickle" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_dtype_mix_fp32_base_bf16_fp16_fine_tunes(env, tmp_path):
    """A float32 base with a bfloat16 and a float16 fine-tune: works; each output keeps its model's
    dtype and equals the float32 computation on the upcast weights, rounded once."""
    half = [
        copy_model(env["fts"][0], tmp_path / "ft_bf16", lambda sd: {k: v.to(torch.bfloat16) for k, v in sd.items()}),
        copy_model(env["fts"][1], tmp_path / "ft_fp16", lambda sd: {k: v.to(torch.float16) for k, v in sd.items()}),
    ]
    up = [
        copy_model(half[0], tmp_path / "ft_bf16_up", lambda sd: {k: v.float() for k, v in sd.items()}),
        copy_model(half[1], tmp_path / "ft_fp16_up", lambda sd: {k: v.float() for k, v in sd.items()}),
    ]
    a, b = tmp_path / "mixed", tmp_path / "upcast"
    assert cli(purify_argv(env, a, models=half)) == 0
    assert cli(purify_argv(env, b, models=up)) == 0
    for h, u, dt in zip(half, up, (torch.bfloat16, torch.float16)):
        wa = load_file(str(a / h.name / "model.safetensors"))
        wb = load_file(str(b / u.name / "model.safetensors"))
        ft = load_file(str(h / "model.safetensors"))
        eps = torch.finfo(dt).eps
        for k in wa:
            assert wa[k].dtype == dt, k
            # one rounding to the half dtype apart (task vector rounded before the addition)
            tol = 2 * eps * float(wb[k].abs().max())
            assert float((wa[k].float() - wb[k]).abs().max()) <= tol, k
            if "norm" in k:  # not purified: bit for bit the fine-tuned value
                assert torch.equal(wa[k], ft[k]), k

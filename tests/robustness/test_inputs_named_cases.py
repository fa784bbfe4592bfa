"""The inputs that gave a wrong result with exit 0, or a traceback, run as a user would: each is now
a correct result or one ``ERROR pave:`` line naming the file, row, layer or flag (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from inputs_helpers import run_pave
from inputs_helpers import purify_argv


def one_error(code: int, errors: list[str], text: str, *needles: str) -> str:
    assert code == 2, text[-1500:]
    assert len(errors) == 1 and "\n" not in errors[0] and "Traceback" not in text, errors
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def collect_argv(env, out: Path, *extra, data=None, model=None) -> list:  # noqa: F811
    return ["collect", "--model", model or env["cdir"], "--data", data or env["data"], "--no-progress", "--device", "cpu",
            "-o", out, *extra]


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------------ silent wrong results
def test_a_fine_tune_identical_to_its_base_gives_a_strict_json_report(env, tmp_path):  # noqa: F811
    same = tmp_path / "same"
    shutil.copytree(env["base"], same)
    out = tmp_path / "out"
    code, _, text = run_pave(purify_argv(env, out, models=[env["fts"][0], same], covs=env["covs"]))
    assert code == 0, text[-1000:]
    report = _strict((out / "pave_rank_report.json").read_text())
    changes = [m["relative_change"] for t in report["tensors"].values() for lab, m in t["models"].items()
               if lab == same.name and m.get("purified")]
    assert changes and all(c is None or c == 0 for c in changes)  # 0 / 0: null, never NaN or Infinity


def test_half_precision_overflow_in_collect_is_refused_naming_the_layer(env, tmp_path):  # noqa: F811
    from collect_helpers import save_model_dir, tiny_llama

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1e7)  # activations beyond float16 65504
    folder = save_model_dir(tmp_path / "hot", model)
    out = tmp_path / "c.safetensors"
    code, errors, text = run_pave(["collect", "--model", folder, "--data", env["data"], "--no-progress", "--device",
                                   "cpu", "--model-dtype", "float16", "-o", out])
    msg = one_error(code, errors, text, "layer model.layers.", "--model-dtype float32 or bfloat16")
    assert "NaN or Inf" in msg and not out.exists()


def test_check_refuses_a_file_with_a_non_finite_matrix(env, tmp_path):  # noqa: F811
    good = tmp_path / "c.safetensors"
    assert run_pave(collect_argv(env, good))[0] == 0
    tensors = load_file(str(good))
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    key = sorted(tensors)[0]
    tensors[key][1, 2] = tensors[key][2, 1] = float("inf")
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    code, errors, text = run_pave(["collect", "--check", bad, "--model", env["cdir"]])
    one_error(code, errors, text, str(bad), f"covariance {key!r}", "contains NaN or Inf")


def test_a_half_precision_collection_fits_its_own_model(env, tmp_path):  # noqa: F811
    for dtype in ("float16", "bfloat16"):
        out = tmp_path / f"{dtype}.safetensors"
        assert run_pave(collect_argv(env, out, "--model-dtype", dtype))[0] == 0
        code, _, text = run_pave(["collect", "--check", out, "--model", env["cdir"]])
        assert code == 0, (dtype, text[-800:])


def test_fusion_bench_covariances_naming_a_model_not_in_the_pool_are_refused(env):  # noqa: F811
    from fusion_bench.modelpool import CausalLMPool

    from pave_plugins.fusion_bench.pave import PAVEAlgorithm, PAVEConfigError

    pool = CausalLMPool(models={"_pretrained_": str(env["base"]), "a": str(env["fts"][0]), "b": str(env["fts"][1])},
                        tokenizer=None)
    covs = {"a": str(env["covs"][0]), "b": str(env["covs"][1]), "task_c": str(env["covs"][1])}
    with pytest.raises(PAVEConfigError, match=r"method.covariances names \['task_c'\], which the model pool does not have"):
        PAVEAlgorithm(covariances=covs).run(pool)


def test_mergekit_regmean_without_any_covariance_is_the_plain_mean(caplog):
    from mergekit.merge_methods.api import merge_state_dicts

    g = torch.Generator().manual_seed(0)
    models = [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)} for _ in range(3)]
    merged = merge_state_dicts(models, "regmean")
    for k in ("w", "b"):
        assert torch.allclose(merged[k], sum(m[k] for m in models) / 3)
    # said once per merge (some models lacking a covariance stays an error: test_mergekit_regmean)
    assert sum("no model has a covariance file" in r.getMessage() for r in caplog.records) == 1


# ---------------------------------------------------------------------------- data files
def test_data_that_is_not_utf8_is_named_with_its_line(env, tmp_path):  # noqa: F811
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    code, errors, text = run_pave(collect_argv(env, tmp_path / "c.safetensors", data=data))
    one_error(code, errors, text, f"{data}: line 2 is not UTF-8 text")


def test_a_byte_order_mark_and_crlf_are_read(env, tmp_path):  # noqa: F811
    rows = ["text,label", *[f"sentence number {i} is here,{i % 2}" for i in range(6)]]
    csv_file = tmp_path / "d.csv"
    csv_file.write_bytes(("\ufeff" + "\r\n".join(rows) + "\r\n").encode("utf-8"))
    plain = tmp_path / "p.csv"
    plain.write_text("\n".join(rows) + "\n")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert run_pave(collect_argv(env, a, data=csv_file))[0] == 0
    assert run_pave(collect_argv(env, b, data=plain))[0] == 0
    assert all(torch.equal(x, y) for x, y in zip(load_file(str(a)).values(), load_file(str(b)).values()))


def test_a_template_with_a_bad_format_spec_names_the_row(env, tmp_path):  # noqa: F811
    code, errors, text = run_pave(collect_argv(env, tmp_path / "c.safetensors", "--template", "{text:>x}"))
    one_error(code, errors, text, f"{env['data']}: row 1: the template '{{text:>x}}' cannot format it")


def test_a_text_longer_than_the_models_positions_names_max_length(env, tmp_path):  # noqa: F811
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"text": " ".join(["hello world"] * 200)}) + "\n")
    code, errors, text = run_pave(collect_argv(env, tmp_path / "c.safetensors", "--max-length", "1000", data=data))
    one_error(code, errors, text, str(data), "more than the model's 64 positions: lower --max-length to 64 or less")


@pytest.mark.parametrize("seed", ["-1", str(2**32), "1e3"])
def test_a_seed_out_of_range_names_the_flag(env, tmp_path, seed, capsys):  # noqa: F811
    code, _, _ = run_pave(collect_argv(env, tmp_path / "c.safetensors", "--seed", seed))
    assert code == 2 and "argument --seed" in capsys.readouterr().err


# ------------------------------------------------------------------------------- adapters
@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    from rethink_helpers import build_llama_lora

    tmp = tmp_path_factory.mktemp("lora")
    adapters, calib = build_llama_lora(tmp, n_adapters=1)
    return tmp, adapters["t0"], calib


def _rethink_lora(tmp, adapter, calib, out, *extra):
    return ["rethink", "--base", tmp / "base", "--lora", f"t0={adapter}", "--calib", f"t0={calib}", "--epochs", "1",
            "--iterations", "1", "--no-progress", "--device", "cpu", "--out", out, *extra]


@pytest.mark.parametrize("edit", ["malformed", "r zero", "r text", "other width"])
def test_a_bad_lora_adapter_is_one_line_naming_it(lora, tmp_path, edit):
    tmp, adapter, calib = lora
    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    cfg_file = bad / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    if edit == "malformed":
        cfg_file.write_text(cfg_file.read_text()[:-20])
    elif edit in ("r zero", "r text"):
        cfg["r"] = 0 if edit == "r zero" else "four"
        cfg_file.write_text(json.dumps(cfg))
    else:
        t = load_file(str(bad / "adapter_model.safetensors"))
        t = {k: torch.cat([v, v], dim=1) if ".lora_A." in k else v for k, v in t.items()}  # a wider input
        save_file(t, str(bad / "adapter_model.safetensors"))
    code, errors, text = run_pave(_rethink_lora(tmp, bad, calib, tmp_path / "out"))
    one_error(code, errors, text, str(bad))
    assert not (tmp_path / "out").exists()


def test_a_huge_learning_rate_names_lr(lora, tmp_path):
    tmp, adapter, calib = lora
    code, errors, text = run_pave(_rethink_lora(tmp, adapter, calib, tmp_path / "out", "--lr", "1e308", "--epochs", "3"))  # Adam steps ~lr: Lambda overflows
    one_error(code, errors, text, "too large?): lower the learning rate (--lr)")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- checkpoints
def test_a_trainer_checkpoint_with_allow_pickle_reads_only_the_weights(env, tmp_path):  # noqa: F811
    """A Trainer checkpoint folder (pytorch_model.bin beside optimizer.pt, scheduler.pt,
    rng_state.pth): the pickles that are not weights are not read as weights."""
    ckpts = []
    for i, ft in enumerate(env["fts"]):
        d = tmp_path / f"checkpoint-{i}"
        d.mkdir()
        for f in ft.iterdir():
            if f.suffix != ".safetensors":
                shutil.copy2(f, d / f.name)
        torch.save(load_file(str(ft / "model.safetensors")), d / "pytorch_model.bin")
        torch.save({"step": torch.tensor(5)}, d / "scheduler.pt")
        torch.save({"rng": torch.arange(3)}, d / "rng_state.pth")
        torch.save({"state": {}, "param_groups": []}, d / "optimizer.pt")
        ckpts.append(d)
    out, ref = tmp_path / "out", tmp_path / "ref"
    code, _, text = run_pave(purify_argv(env, out, models=ckpts, extra=("--allow-pickle",)))
    assert code == 0, text[-1000:]
    assert run_pave(purify_argv(env, ref))[0] == 0
    got = load_file(str(out / "checkpoint-0" / "model.safetensors"))
    want = load_file(str(ref / env["fts"][0].name / "model.safetensors"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_bad_covariance_in_a_mergekit_yaml_run_is_one_line(env, tmp_path):  # noqa: F811
    """mergekit-yaml: an error this package raises on a user's input is one line (no traceback)."""
    import subprocess
    import sys

    import yaml
    from safetensors import safe_open

    tensors = load_file(str(env["covs"][1]))
    with safe_open(str(env["covs"][1]), framework="pt") as f:
        meta = f.metadata()
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    recipe = {"merge_method": "pave", "base_model": str(env["base"]), "dtype": "float32",
              "models": [{"model": str(m), "parameters": {"weight": 1.0, "covariance": str(c)}}
                         for m, c in zip(env["fts"], [env["covs"][0], bad])],
              "parameters": {"inner": "task_arithmetic", "rho": 0.875}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    exe = Path(sys.executable).with_name("mergekit-yaml")
    r = subprocess.run([str(exe), str(tmp_path / "r.yaml"), str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=300)
    errors = [ln for ln in r.stderr.splitlines() if "ERROR" in ln]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(errors) == 1 and str(bad) in errors[0] and "contains NaN or Inf" in errors[0], errors


def test_regmean_refuses_one_indefinite_covariance_that_the_sum_would_hide(env, tmp_path):  # noqa: F811
    """RegMean factors the sum of the models' Gram matrices: one indefinite file summed with a
    positive definite one can pass as a sum; each model's matrix is checked where it enters."""
    from inputs_helpers import cov_variant

    from pave_plugins.engine.regmean import RegMeanEngine, RegMeanSettings
    from pave_plugins.io.covariance import CovarianceFile, CovarianceFileError

    other = load_file(str(env["covs"][0]))

    def indefinite(key, c):  # C_1 - 0.99 C_0: indefinite, yet C_0 + it = 0.01 C_0 + C_1 is definite
        return c - 0.99 * other[key]

    bad = cov_variant(env, tmp_path / "bad.safetensors", indefinite)
    good = CovarianceFile(env["covs"][0])
    name = next(n for n in good.layers if n.endswith("q_proj"))
    total = good.get(name).double() + CovarianceFile(bad).get(name).double()
    assert float(torch.linalg.eigvalsh(total)[0]) > 0  # the sum alone would pass
    w = load_file(str(env["fts"][0] / "model.safetensors"))[f"{name}.weight"]
    engine = RegMeanEngine(RegMeanSettings(), [good, CovarianceFile(bad)], ["a", "b"])
    with pytest.raises(CovarianceFileError, match=rf"in {bad}: (is not positive semi-definite|has negative diagonal)"):
        engine.step(f"{name}.weight", [w, w])


@pytest.fixture(scope="module")
def nan_norm(env, tmp_path_factory):  # noqa: F811
    """A copy of fine-tune 1 whose first LayerNorm weight holds a NaN (PAVE does not purify norms)."""
    d = tmp_path_factory.mktemp("nan") / "ft_nan"
    shutil.copytree(env["fts"][1], d)
    t = load_file(str(d / "model.safetensors"))
    key = "model.layers.0.input_layernorm.weight"
    t[key][0] = float("nan")
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d, key


@pytest.mark.parametrize("face", ["pave purify", "fusion_bench pave/pave", "fusion_bench pave/tsv_m", "mergekit tsv"])
def test_a_non_finite_fine_tune_is_refused_by_every_face(env, nan_norm, tmp_path, face):  # noqa: F811
    d, key = nan_norm
    if face == "pave purify":
        code, errors, text = run_pave(purify_argv(env, tmp_path / "out", models=[env["fts"][0], d]))
        one_error(code, errors, text, f"{key}: the weight of {d} contains NaN or Inf")
        return
    if face == "mergekit tsv":
        from outputs_helpers import merge

        recipe = {"merge_method": "tsv", "base_model": str(env["base"]), "dtype": "float32",
                  "models": [{"model": str(m)} for m in (env["fts"][0], d)]}
        with pytest.raises(ValueError, match=rf"{key}: the weight of .*ft_nan.* contains NaN or Inf"):
            merge(recipe, tmp_path / "out")
        return
    from fusion_bench.modelpool import CausalLMPool

    from pave_plugins.fusion_bench import PAVEAlgorithm, TSVMerging

    pool = CausalLMPool(models={"_pretrained_": str(env["base"]), "a": str(env["fts"][0]), "b": str(d)},
                        tokenizer=None)
    algo = (PAVEAlgorithm(covariances={"a": str(env["covs"][0]), "b": str(env["covs"][1])})
            if face.endswith("pave") else TSVMerging())
    with pytest.raises(ValueError, match=rf"^{key}: the weight of b contains NaN or Inf$"):
        algo.run(pool)


def test_a_covariance_folder_or_a_broken_config_is_named_for_what_it_is(env, tmp_path):  # noqa: F811
    folder = tmp_path / "covs"
    folder.mkdir()
    code, errors, text = run_pave(purify_argv(env, tmp_path / "out", covs=[env["covs"][0], folder]))
    one_error(code, errors, text, f"{folder} is a folder, not a covariance file")
    broken = tmp_path / "model"
    shutil.copytree(env["cdir"], broken)
    (broken / "config.json").write_text("{")
    code, errors, text = run_pave(collect_argv(env, tmp_path / "c.safetensors", model=broken))
    one_error(code, errors, text, f"{broken / 'config.json'}: not valid JSON")

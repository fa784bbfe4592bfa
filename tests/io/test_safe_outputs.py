"""Never lose a user's files: outputs that can never overwrite inputs, failed or killed runs that
leave the previous output whole, every bad value refused up front.

Each case runs a command as a user would (``pave`` through :func:`pave_plugins.cli.main`, mergekit's
``run_merge``), asserts the exit status (or exception) and the message, and that every input and
any previous output are byte-for-byte what they were.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch
import yaml

from inputs_helpers import snapshot
from outputs_helpers import merge, pave, pave_recipe, purify_args, rethink_args, snap_all



# ----------------------------------------------------------------------------------- helpers




















# ------------------------------------------------ 1. outputs never overwrite or enclose inputs
def test_purify_overwrite_into_the_folder_holding_the_inputs_is_refused(own, capsys, caplog):
    fam = own
    before = snap_all(fam["root"])
    code, msg = pave(purify_args(fam, fam["root"], None, None, "--overwrite"), capsys, caplog)
    assert code == 2
    assert f"--out {fam['root']} contains the input --base {fam['base']}" in msg
    assert snap_all(fam["root"]) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_purify_out_equal_to_a_fine_tune_is_refused(own, capsys, caplog, overwrite):
    fam = own
    ft = fam["fts"][1]
    before = snap_all(fam["root"])
    code, msg = pave(purify_args(fam, ft, None, None, *(["--overwrite"] if overwrite else [])), capsys, caplog)
    assert code == 2 and f"--out {ft} is the input --model {ft}" in msg
    assert snap_all(fam["root"]) == before


def test_purify_out_inside_the_base_or_through_a_symlink_is_refused(own, capsys, caplog, tmp_path):
    fam = own
    before = snap_all(fam["root"])
    inside = fam["base"] / "purified"
    code, msg = pave(purify_args(fam, inside), capsys, caplog)
    assert code == 2 and f"--out {inside} lies inside the input --base {fam['base']}" in msg
    link = tmp_path / "link_to_ft0"
    link.symlink_to(fam["fts"][0], target_is_directory=True)
    code, msg = pave(purify_args(fam, link, None, None, "--overwrite"), capsys, caplog)
    assert code == 2 and f"--out {link} is the input --model {fam['fts'][0]}" in msg
    code, msg = pave(purify_args(fam, fam["covs"][0], None, None, "--overwrite"), capsys, caplog)
    assert code == 2 and f"is the input --covariance {fam['covs'][0]}" in msg
    assert snap_all(fam["root"]) == before and not inside.exists()


def test_purify_overwrite_replaces_only_an_earlier_purify_output(fam, capsys, caplog, tmp_path):
    out = tmp_path / "purified"
    assert pave(purify_args(fam, out), capsys, caplog)[0] == 0
    first = snapshot(out)
    # a file of the user's next to the earlier output: refused, nothing changed
    (out / "notes.txt").write_text("keep me")
    code, msg = pave(purify_args(fam, out, None, None, "--overwrite"), capsys, caplog)
    assert code == 2 and "holds notes.txt, which pave purify did not write" in msg
    assert snapshot(out) == {**first, "notes.txt": snapshot(out / "notes.txt")}
    (out / "notes.txt").unlink()
    # a folder that is no purify output at all (e.g. another model): refused
    other = tmp_path / "some_model"
    shutil.copytree(fam["fts"][0], other)
    before = snapshot(other)
    code, msg = pave(purify_args(fam, other, None, None, "--overwrite"), capsys, caplog)
    assert code == 2 and "is not an earlier output of pave purify (it has no readable .pave-output.json)" in msg
    assert snapshot(other) == before
    # an earlier output alone: replaced by the new complete one
    code, _ = pave(purify_args(fam, out, None, None, "--overwrite", "--rho", "0.75"), capsys, caplog)
    assert code == 0 and json.loads((out / "pave_rank_report.json").read_text())["settings"]["rho"] == 0.75


def test_rethink_out_equal_to_merged_is_refused(seq, capsys, caplog):
    merged = seq["root"] / "merged"
    before = snap_all(seq["root"])
    code, msg = pave(rethink_args(seq, merged, "--overwrite"), capsys, caplog)
    assert code == 2 and f"--out {merged} is the input --merged {merged}" in msg
    calib = next(iter(seq["calib"].values()))
    code, msg = pave(rethink_args(seq, calib, "--overwrite"), capsys, caplog)
    assert code == 2 and f"is the input --calib {calib}" in msg
    assert snap_all(seq["root"]) == before


def test_rethink_overwrite_of_a_folder_with_user_files_is_refused(seq, capsys, caplog, tmp_path):
    out = tmp_path / "rethought"
    assert pave(rethink_args(seq, out), capsys, caplog)[0] == 0
    (out / "notes.txt").write_text("keep me")
    before = snapshot(out)
    code, msg = pave(rethink_args(seq, out, "--overwrite"), capsys, caplog)
    assert code == 2 and "holds notes.txt, which pave rethink did not write" in msg
    assert snapshot(out) == before
    (out / "notes.txt").unlink()
    assert pave(rethink_args(seq, out, "--overwrite"), capsys, caplog)[0] == 0


def test_collect_into_the_model_folder_or_onto_its_data_is_refused(col, capsys, caplog, tmp_path):
    before = snap_all(col["root"])
    weights = col["model"] / "model.safetensors"
    base = ["collect", "--model", col["model"], "--data", col["data"], "--no-progress", "--device", "cpu"]
    code, msg = pave(base + ["-o", weights, "--overwrite"], capsys, caplog)
    assert code == 2 and f"-o/--out {weights} lies inside the input --model {col['model']}" in msg
    code, msg = pave(base + ["-o", col["data"], "--overwrite"], capsys, caplog)
    assert code == 2 and f"-o/--out {col['data']} is the input --data {col['data']}" in msg
    # --overwrite replaces only a covariance file
    other = tmp_path / "results.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.ones(2)}, str(other))
    other_before = snapshot(other)
    code, msg = pave(base + ["-o", other, "--overwrite"], capsys, caplog)
    assert code == 2 and f"-o/--out {other} is not an earlier output of pave collect" in msg
    assert snapshot(other) == other_before and snap_all(col["root"]) == before


def test_collect_merge_onto_one_of_its_parts_is_refused(own, capsys, caplog):
    fam = own
    before = snap_all(fam["root"])
    code, msg = pave(["collect", "--merge", *fam["covs"], "-o", fam["covs"][0], "--overwrite"], capsys, caplog)
    assert code == 2 and f"-o/--out {fam['covs'][0]} is the input --merge {fam['covs'][0]}" in msg
    assert snap_all(fam["root"]) == before


def test_bench_out_inside_its_data_is_refused(col, capsys, caplog):
    before = snap_all(col["root"])
    code, msg = pave(["bench", "--data", col["root"], "--model", col["model"], "--out", col["root"] / "results",
                      "--cache", col["root"].parent / "bench_cache"], capsys, caplog)
    assert code == 2 and f"--out {col['root'] / 'results'} lies inside the input --data {col['root']}" in msg
    assert snap_all(col["root"]) == before


# ------------------------------------ 2. a report always describes the model beside it (mergekit)
@pytest.fixture
def merged(fam, tmp_path):
    out = tmp_path / "merged"
    merge(pave_recipe(fam), out)
    assert json.loads((out / "pave_rank_report.json").read_text())["complete"] is True
    assert not (out / ".pave_rank_report.partial.json").exists()
    return out


def test_failed_pave_rerun_at_the_first_tensor_keeps_the_old_report(fam, merged):
    before = snapshot(merged)
    with pytest.raises(Exception, match="weight"):  # ties needs a per-model weight
        merge(pave_recipe(fam, weights=False), merged)
    assert snapshot(merged / "pave_rank_report.json") == before["pave_rank_report.json"]
    assert snapshot(merged) == before


def test_pave_rerun_failing_mid_merge_keeps_the_old_report(fam, merged, tmp_path):
    from inputs_helpers import cov_variant

    def poison(key, c):
        c = c.clone()
        return c.fill_(float("nan")) if c.shape[0] == 48 else c  # the down_proj input (intermediate 48)

    env = {"covs": fam["covs"]}
    bad = cov_variant(env, tmp_path / "bad.safetensors", poison, src=1)
    report_before = snapshot(merged / "pave_rank_report.json")
    with pytest.raises(ValueError, match="NaN or Inf"):
        merge(pave_recipe(fam, covs=[fam["covs"][0], bad]), merged)
    # (the first mlp.down_proj fails, after the embedding and attention tensors were merged)
    assert snapshot(merged / "pave_rank_report.json") == report_before


def test_stock_merge_into_a_pave_folder_removes_the_stale_report(fam, merged):
    stock = {"merge_method": "ties", "base_model": str(fam["base"]), "dtype": "float32",
             "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in fam["fts"]]}
    merge(stock, merged)
    assert not (merged / "pave_rank_report.json").exists()
    assert (merged / "model.safetensors").is_file()


def test_killed_pave_merge_keeps_the_old_report(fam, merged):
    from outputs_helpers import Killer

    recipe = merged.parent / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(pave_recipe(fam, extra_global={"rho": 0.75})))
    code = ("import logging, sys, time, yaml; logging.basicConfig(level=logging.INFO);"
            "from mergekit.config import MergeConfiguration; from mergekit.merge import run_merge;"
            "from mergekit.options import MergeOptions; import pave_plugins.mergekit.pave as p;"
            "orig = p.PaveMerge.merge_group\n"
            "def slow(self, *a, **k):\n    time.sleep(0.3); return orig(self, *a, **k)\n"
            "p.PaveMerge.merge_group = slow\n"
            f"run_merge(MergeConfiguration.model_validate(yaml.safe_load(open({str(recipe)!r}))), {str(merged)!r},"
            " options=MergeOptions(copy_tokenizer=False, quiet=True))")
    report_before = snapshot(merged / "pave_rank_report.json")
    k = Killer([sys.executable, "-c", code], line="pave: purified", delay=0.5, timeout=120).run()
    assert k.killed_while_running, "".join(k.stderr)[-2000:]
    assert snapshot(merged / "pave_rank_report.json") == report_before


# ------------------------------------------------------------------------------- 3. recipes
@pytest.mark.parametrize("where", ["global", "list", "folder"])
def test_covariance_where_it_cannot_be_meant_is_refused(fam, tmp_path, where):
    recipe = pave_recipe(fam)
    if where == "global":
        recipe["parameters"]["covariance"] = str(fam["covs"][0])
        for m in recipe["models"]:
            m["parameters"].pop("covariance")
        pattern = r"`covariance:` under the recipe's global `parameters` would give every model the same covariance"
    elif where == "list":
        recipe["models"][0]["parameters"]["covariance"] = [str(c) for c in fam["covs"]]
        pattern = r"model .*llama_ft0: covariance must be one file path, got list"
    else:
        recipe["models"][1]["parameters"]["covariance"] = str(fam["root"])
        pattern = rf"model .*llama_ft1: covariance {fam['root']} is a folder"
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=pattern):
        merge(recipe, out)
    assert not out.exists() or not any(out.iterdir())


def test_unknown_pave_parameter_warns_with_the_nearest_name(fam, caplog):
    from mergekit.config import MergeConfiguration
    from mergekit.merge_methods import registry

    from pave_plugins.mergekit.recipe import check_recipe

    config = MergeConfiguration.model_validate(pave_recipe(fam, extra_global={"rhoo": 0.5}))
    with caplog.at_level(logging.WARNING, logger="pave_plugins"):
        check_recipe(config, registry.get("pave"))
    assert any("unknown parameter 'rhoo'" in r.getMessage() and "did you mean 'rho'?" in r.getMessage()
               for r in caplog.records)


# ---------------------------------------------------------------------------------- 4. data
@pytest.mark.parametrize("odd_first", [False, True])
def test_collect_rows_lacking_the_text_field_name_file_and_row(col, capsys, caplog, tmp_path, odd_first):
    from collect_helpers import write_jsonl

    rows = [{"text": "a b c"}, {"text": "d e"}, {"sentence": "no text here", "label": 1}, {"text": "f"}]
    if odd_first:
        rows = [rows[2]] + rows[:2] + rows[3:]
    data = write_jsonl(tmp_path / "odd.jsonl", rows)
    out = tmp_path / "c.safetensors"
    code, msg = pave(["collect", "--model", col["model"], "--data", data, "--n-samples", "0", "--no-progress",
                      "--device", "cpu", "-o", out], capsys, caplog)
    row = 1 if odd_first else 3
    assert code == 2, msg
    assert f"{data}: row {row} has no field 'text' (that row has ['label', 'sentence'])" in msg
    assert not out.exists()


def test_collect_template_fields_are_checked_on_every_row(col, capsys, caplog, tmp_path):
    from collect_helpers import write_jsonl

    data = write_jsonl(tmp_path / "pairs.jsonl", [{"a": "x", "b": "y"}, {"a": "z"}])
    out = tmp_path / "c.safetensors"
    code, msg = pave(["collect", "--model", col["model"], "--data", data, "--template", "{a} {b}", "--no-progress",
                      "-o", out], capsys, caplog)
    assert code == 2 and f"{data}: row 2 has no field 'b' (that row has ['a'])" in msg
    code, msg = pave(["collect", "--model", col["model"], "--data", data, "--template", "{a", "--no-progress",
                      "-o", out], capsys, caplog)
    assert code == 2 and "template '{a' is not a valid format string" in msg
    assert not out.exists()


# ------------------------------------------------------------------- 5. bad numbers up front
@pytest.mark.parametrize("flag,value", [
    ("--max-length", "-5"), ("--max-length", "0"), ("--batch-size", "0"), ("--samples", "-1"),
    ("--epochs", "-1"), ("--iterations", "0"), ("--lr", "nan"), ("--lr", "-1"), ("--top-k", "0"),
])
def test_rethink_bad_numbers_are_refused_naming_the_flag(seq, capsys, caplog, tmp_path, flag, value):
    out = tmp_path / "out"
    before = snap_all(seq["root"])
    code, msg = pave(rethink_args(seq, out, flag, value), capsys, caplog)
    assert code == 2 and f"argument {flag}: " in msg and value in msg
    assert not out.exists() and snap_all(seq["root"]) == before


@pytest.mark.parametrize("argv", [
    ["--max-length", "0"], ["--batch-size", "-2"], ["--n-samples", "-1"], ["--layers", "mlp[("],
])
def test_collect_bad_values_are_refused_naming_the_flag(col, capsys, caplog, tmp_path, argv):
    out = tmp_path / "c.safetensors"
    code, msg = pave(["collect", "--model", col["model"], "--data", col["data"], *argv, "-o", out], capsys, caplog)
    assert code == 2 and f"argument {argv[0]}: " in msg
    assert "Traceback" not in msg and not out.exists()


def test_purify_bad_values_are_refused_naming_the_flag(fam, capsys, caplog, tmp_path):
    for argv in (["--max-shard-size", "0"], ["--rho", "nan"]):
        code, msg = pave(purify_args(fam, tmp_path / "o", None, None, *argv), capsys, caplog)
        assert code == 2 and f"argument {argv[0]}: " in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(col, seq, capsys, caplog, tmp_path):
    code, msg = pave(["collect", "--model", col["model"], "--data", col["data"], "--device", "cuda",
                      "-o", tmp_path / "c.safetensors"], capsys, caplog)
    assert code == 2 and "argument --device: cuda: no CUDA device here" in msg and "Traceback" not in msg
    code, msg = pave(rethink_args(seq, tmp_path / "o", "--device", "cuda:0"), capsys, caplog)
    assert code == 2 and "argument --device: cuda:0: no CUDA device here" in msg


# ---------------------------------------------------------------------- 6. concurrent writers
def test_an_output_that_appears_during_the_run_is_not_replaced(col, capsys, caplog, tmp_path, monkeypatch):
    """Two `pave collect` runs to the same new output: the one finishing second does not replace
    the first's file (simulated: the file appears while this run collects)."""
    import pave_plugins.collect.pipeline as pipeline

    out = tmp_path / "c.safetensors"
    original = pipeline.collect_from_texts

    def other_run_finishes_first(*a, **k):
        result = original(*a, **k)
        shutil.copy(col["root"] / "first.safetensors", out)
        return result

    code, _ = pave(["collect", "--model", col["model"], "--data", col["data"], "--no-progress", "--device", "cpu",
                    "-o", col["root"] / "first.safetensors"], capsys, caplog)
    assert code == 0
    monkeypatch.setattr(pipeline, "collect_from_texts", other_run_finishes_first)
    code, msg = pave(["collect", "--model", col["model"], "--data", col["data"], "--no-progress", "--device", "cpu",
                      "--seed", "7", "-o", out], capsys, caplog)
    # refused whether the transaction's own check or its final one sees the other run's file
    assert code == 2 and (f"{out} appeared while this run was writing it" in msg or f"{out} exists (pass --overwrite" in msg)
    assert snapshot(out) == snapshot(col["root"] / "first.safetensors")
    assert not [p for p in tmp_path.iterdir() if ".pave-" in p.name]


def test_atomic_directory_does_not_replace_a_folder_that_appeared(tmp_path):
    from pave_plugins.io.output import OutputError, output_folder

    out = tmp_path / "out"
    with pytest.raises(OutputError, match="appeared while this run was writing it"):
        with output_folder(out, who="test") as tmp:
            (tmp / "a").write_text("mine")
            out.mkdir()
            (out / "b").write_text("theirs")
    assert snapshot(out) == {"b": snapshot(out / "b")}


# ------------------------------------------------------------------------------- 7. umask
def test_outputs_get_the_users_umask(fam, capsys, caplog, tmp_path):
    mask = 0o027  # not the usual 022, so that a hard-coded mode would show
    old = os.umask(mask)
    try:
        out = tmp_path / "purified"
        assert pave(purify_args(fam, out), capsys, caplog)[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((out / "pave_rank_report.json").stat().st_mode) == 0o666 & ~mask


# ------------------------------------------------------- 8. low precision, damping at default level
def test_half_precision_covariance_file_warns(fam, tmp_path, caplog):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from pave_plugins.io.covariance import CovarianceFile

    half = tmp_path / "half.safetensors"
    with safe_open(str(fam["covs"][0]), framework="pt") as f:
        save_file({k: f.get_tensor(k).to(torch.bfloat16) for k in f.keys()}, str(half), metadata=f.metadata())
    with caplog.at_level(logging.WARNING, logger="pave_plugins"):
        CovarianceFile(half)
    assert any(f"{half}: covariances stored in bfloat16" in r.getMessage() for r in caplog.records)


def test_damping_is_logged_at_info_with_one_warning(fam, tmp_path, capsys, caplog):
    """A damped singular covariance is expected (a task's inputs span fewer directions than the
    layer): each at INFO naming file and layer, and one summary warning at the end of the run."""
    from pave_plugins.io.covariance import CovarianceFile
    from pave_plugins.io.sources import PreparedCache
    from inputs_helpers import cov_variant

    def rank_one(key, c):  # a singular covariance: it needs damping
        v = torch.ones(c.shape[0], 1, dtype=c.dtype)
        return v @ v.T

    singular = cov_variant({"covs": fam["covs"]}, tmp_path / "singular.safetensors", rank_one, src=1)
    layer = "model.layers.0.mlp.down_proj"
    with caplog.at_level(logging.INFO):
        prepared, _ = PreparedCache().get(CovarianceFile(singular), layer, device="cpu", compute_dtype=torch.float64)
    assert prepared.damping > 0
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(f"(layer '{layer}') in {singular} is singular: damped with {prepared.damping:.3g}" in m for m in msgs)
    with caplog.at_level(logging.INFO):
        code, err = pave(purify_args(fam, tmp_path / "out", covs=[fam["covs"][0], singular]), capsys, caplog)
    assert code == 0, err
    per_layer = [r for r in caplog.records if "is singular: damped" in r.getMessage()]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert per_layer and all(r.levelno == logging.INFO for r in per_layer)
    report = json.loads((tmp_path / "out" / "pave_rank_report.json").read_text())
    uses = sum(m.get("damping", 0) > 0 for t in report["tensors"].values() for m in t.get("models", {}).values())
    assert warnings == [w for w in warnings if "singular" in w] and len(warnings) == 1
    assert warnings[0].startswith(f"pave: {uses} singular covariances were damped")


def test_rethink_label_outside_the_head_is_one_line(seq, capsys, caplog, tmp_path):
    """Without --heads every task uses the merged model's 2-class head: the 3-class task's label 2
    is refused naming the file and the records (it was an IndexError traceback)."""
    r = seq["root"]
    code, msg = pave(["rethink", "--base", r / "base", "--merged", r / "merged", "--calib",
                      *[f"{t}={p}" for t, p in seq["calib"].items()], "--epochs", "1", "--no-progress",
                      "--out", tmp_path / "o"], capsys, caplog)
    assert code == 2 and f"calibration file {seq['calib']['topic']}: task 'topic'" in msg
    assert "label 2 is outside the head's 2 classes (0-1)" in msg and not (tmp_path / "o").exists()


@pytest.mark.parametrize("where", ["covariance", "model config", "base folder"])
def test_fusion_bench_report_path_onto_an_input_is_refused(fam, where):
    """method.report_path on a covariance file, inside a pool model or on the base: refused before
    anything is loaded, naming both; no input byte changes."""
    from fusion_bench.modelpool import CausalLMPool

    from pave_plugins.fusion_bench.pave import PAVEAlgorithm, PAVEConfigError

    path, flag = {"covariance": (fam["covs"][1], "covariances"),
                  "model config": (fam["fts"][0] / "config.json", "modelpool.models"),
                  "base folder": (fam["base"], "modelpool.models")}[where]
    pool = CausalLMPool(models={"_pretrained_": str(fam["base"]), "a": str(fam["fts"][0]), "b": str(fam["fts"][1])},
                        tokenizer=None)
    before = snap_all(fam["root"])
    algo = PAVEAlgorithm(covariances={"a": str(fam["covs"][0]), "b": str(fam["covs"][1])}, report_path=str(path))
    with pytest.raises(PAVEConfigError, match=rf"report_path {path} (is|lies inside) the input {flag}"):
        algo.run(pool)
    assert snap_all(fam["root"]) == before


def test_rethink_rows_lacking_a_field_name_file_and_row(seq, capsys, caplog, tmp_path):
    from collect_helpers import write_jsonl

    rows = [json.loads(line) for line in Path(seq["calib"]["sent"]).read_text().splitlines() if line.strip()]
    rows.insert(5, {"text": "no label here"})
    bad = write_jsonl(tmp_path / "sent.jsonl", rows)
    r = seq["root"]
    code, msg = pave(["rethink", "--base", r / "base", "--merged", r / "merged", "--calib", f"sent={bad}",
                      "--samples", "2", "--no-progress", "--out", tmp_path / "o"], capsys, caplog)
    assert code == 2 and f"calibration file {bad}: row 6 has no field 'label' (that row has ['text']; needed by loss=ce" in msg
    assert not (tmp_path / "o").exists()

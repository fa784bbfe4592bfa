"""The situations that lost a user's data before the one output transaction, run as a user would.

Each runs the command through ``pave``'s entry point (or the FusionBench algorithm) and checks the
exit status, the one-line message, and that every input and any earlier output are what they were.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
from inputs_helpers import snapshot
from outputs_helpers import pave, purify_args, rethink_args

from pave_plugins.io.output import MANIFEST


def test_demo_into_a_folder_with_the_users_files_is_refused(tmp_path, capsys, caplog):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    before = snapshot(out)
    code, msg = pave(["demo", "--tasks", "2", "--steps", "2", "--out", out], capsys, caplog)
    assert code == 2 and f"--out {out} already exists and is not empty (pass --overwrite" in msg
    code, msg = pave(["demo", "--tasks", "2", "--steps", "2", "--out", out, "--overwrite"], capsys, caplog)
    assert code == 2 and "has no readable .pave-output.json" in msg
    assert snapshot(out) == before


def test_bench_out_onto_a_folder_with_the_users_results_is_refused(tmp_path, capsys, caplog):
    out = tmp_path / "results"
    out.mkdir()
    (out / "results.md").write_text("my own results")
    code, msg = pave(["bench", "--out", out, "--data", tmp_path / "nodata"], capsys, caplog)
    assert code == 2 and f"--out {out} is not an earlier output of pave bench" in msg
    assert (out / "results.md").read_text() == "my own results"


def test_purify_models_with_the_same_folder_name_get_distinct_outputs(fam, tmp_path, capsys, caplog):  # noqa: F811
    # a/ft, b/ft, c/ft_1: the second `ft` must not become `ft_1` and then be overwritten by the third
    models = []
    for parent, src in zip(("a", "b", "c"), (fam["fts"][0], fam["fts"][1], fam["fts"][0])):
        dst = tmp_path / parent / ("ft_1" if parent == "c" else "ft")
        shutil.copytree(src, dst)
        models.append(dst)
    covs = [fam["covs"][0], fam["covs"][1], fam["covs"][0]]
    out = tmp_path / "purified"
    code, msg = pave(purify_args(fam, out, models, covs), capsys, caplog)
    assert code == 0, msg
    report = json.loads((out / "pave_rank_report.json").read_text())
    assert report["outputs"] == {"ft": str(models[0]), "ft_2": str(models[1]), "ft_1": str(models[2])}
    for name, src in report["outputs"].items():
        assert json.loads((out / name / "pave_purify.json").read_text())["source"] == src
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "pave_rank_report.json", "ft", "ft_1", "ft_2"])


@pytest.mark.parametrize("added", ["FT/my_eval_results.json", "checkpoints/step1/x.bin", "FT/sub/"])
def test_purify_overwrite_refuses_a_users_file_at_any_depth(fam, tmp_path, capsys, caplog, added):  # noqa: F811
    added = added.replace("FT", fam["fts"][0].name)  # inside a model folder pave purify wrote
    out = tmp_path / "purified"
    assert pave(purify_args(fam, out), capsys, caplog)[0] == 0
    p = out / added
    if added.endswith("/"):
        p.mkdir(parents=True)
    else:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("mine")
    before = snapshot(out)
    code, msg = pave(purify_args(fam, out, None, None, "--overwrite"), capsys, caplog)
    assert code == 2 and f"holds {added.split('/')[0] if added.startswith('checkpoints') else added}" in msg, msg
    assert snapshot(out) == before


@pytest.mark.parametrize("lookalike", ["tokenizer_NOTES.txt", "vocab_frequencies.csv", "my.model"])
def test_rethink_overwrite_keeps_files_that_only_look_like_its_own(seq, tmp_path, capsys, caplog, lookalike):  # noqa: F811
    out = tmp_path / "rethought"
    assert pave(rethink_args(seq, out), capsys, caplog)[0] == 0
    (out / lookalike).write_text("mine")
    before = snapshot(out)
    code, msg = pave(rethink_args(seq, out, "--overwrite"), capsys, caplog)
    assert code == 2 and f"holds {lookalike}, which pave rethink did not write" in msg
    assert snapshot(out) == before


def test_overwrite_through_a_symlinked_out_writes_at_the_target(fam, tmp_path, capsys, caplog):  # noqa: F811
    real = tmp_path / "disk2" / "purified"
    assert pave(purify_args(fam, real), capsys, caplog)[0] == 0
    first = (real / "pave_rank_report.json").stat().st_mtime_ns
    link = tmp_path / "here"
    os.symlink(real, link)
    assert pave(purify_args(fam, link, None, None, "--overwrite", "--rho", "0.75"), capsys, caplog)[0] == 0
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real / "pave_rank_report.json").stat().st_mtime_ns != first
    assert json.loads((real / "pave_rank_report.json").read_text())["settings"]["rho"] == 0.75
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk2", "here"]


def test_fusion_bench_report_path_onto_a_models_config_is_refused(fam, tmp_path):  # noqa: F811
    from fusion_bench.modelpool import CausalLMPool

    from pave_plugins.fusion_bench.regmean import RegMeanAlgorithm, RegMeanConfigError

    pool = CausalLMPool(models={"_pretrained_": str(fam["base"]), "a": str(fam["fts"][0]), "b": str(fam["fts"][1])},
                        tokenizer=None)
    config = fam["fts"][0] / "config.json"
    before = config.read_bytes()
    algo = RegMeanAlgorithm(covariances={"a": str(fam["covs"][0]), "b": str(fam["covs"][1])}, report_path=str(config))
    with pytest.raises(RegMeanConfigError, match=rf"report_path {config} lies inside the input modelpool.models"):
        algo.run(pool)
    assert config.read_bytes() == before


def test_a_full_disk_is_one_line_and_keeps_the_previous_output(col, tmp_path):  # noqa: F811
    """`pave collect` with a file-size limit (every writer, the safetensors library too, then fails
    like on a full disk): exit 2, one ERROR line naming the output, the previous file intact."""
    out = tmp_path / "c.safetensors"
    argv = [sys.executable, "-c", "import sys; from pave_plugins.cli import main; sys.exit(main(sys.argv[1:]))", "collect", "--model", str(col["model"]), "--data",
            str(col["data"]), "--no-progress", "--device", "cpu", "-o", str(out)]
    assert subprocess.run(argv, capture_output=True).returncode == 0
    before = out.read_bytes()

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, resource.RLIM_INFINITY))

    r = subprocess.run([*argv, "--overwrite", "--seed", "5"], capture_output=True, text=True, preexec_fn=limit)
    errors = [ln for ln in r.stderr.splitlines() if "ERROR" in ln]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert errors == [errors[0]] and f"cannot write -o/--out {out}: File too large" in errors[0]
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]


def test_safetensors_outputs_get_the_umask(fam, tmp_path, capsys, caplog):  # noqa: F811
    old = os.umask(0o022)
    try:
        out = tmp_path / "purified"
        assert pave(purify_args(fam, out), capsys, caplog)[0] == 0
    finally:
        os.umask(old)
    for p in out.rglob("*"):
        mode = p.stat().st_mode & 0o777
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))
    assert (out / MANIFEST).is_file()


@pytest.mark.parametrize("where", ["inside a fine-tune", "the base", "around the models"])
def test_a_mergekit_merge_into_an_input_is_refused_before_planning(fam, tmp_path, where):  # noqa: F811
    """mergekit would write its shards into the folder: for pave / tsv / regmean merges an output
    folder that is, holds or lies inside a model or covariance file of the recipe is refused."""
    from outputs_helpers import merge, pave_recipe

    from pave_plugins.mergekit.recipe import RecipeParameterError

    out = {"inside a fine-tune": fam["fts"][0] / "merged", "the base": fam["base"],
           "around the models": fam["root"]}[where]
    before = {str(p): snapshot(p) for p in (fam["base"], *fam["fts"], *fam["covs"])}
    with pytest.raises(RecipeParameterError, match=r"output folder .* (is|contains|lies inside) the input"):
        merge(pave_recipe(fam), out)
    assert {str(p): snapshot(p) for p in (fam["base"], *fam["fts"], *fam["covs"])} == before

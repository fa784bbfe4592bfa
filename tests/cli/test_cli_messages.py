"""What a user sees when something is wrong: CLI errors name the CLI's flags, and a bad ``pave``
parameter in a mergekit recipe is one line naming the parameter and its allowed values."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pave_plugins.cli import main
from pave_plugins.demo import run_demo

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    run_demo(root, num_tasks=2, steps=5)
    return root


def test_existing_output_names_the_overwrite_flag(demo, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["purify", "--base", str(demo / "base")]
    for k in range(2):
        argv += ["--model", str(demo / f"ft_task_{k}"), "--covariance", str(demo / "covs" / f"task_{k}.safetensors")]
    assert main([*argv, "--out", str(out)]) == 2
    assert "pass --overwrite to replace it" in caplog.text and "pass overwrite" not in caplog.text
    assert (out / "keep.txt").read_text() == "mine"


def test_fingerprint_mismatch_names_the_flag(demo, caplog):
    # task 0's covariances checked against fine-tune 1: same shapes, other weights
    argv = ["collect", "--check", str(demo / "covs" / "task_0.safetensors"), "--model", str(demo / "ft_task_1")]
    assert main(argv) == 2
    assert "fingerprint" in caplog.text and "--allow-fingerprint-mismatch" in caplog.text
    assert "on_fingerprint_mismatch" not in caplog.text
    caplog.clear()
    assert main([*argv, "--allow-fingerprint-mismatch"]) == 0


def _bad_recipe(demo: Path, tmp_path: Path, edit) -> Path:
    recipe = yaml.safe_load((demo / "mergekit" / "pave_ta.yaml").read_text())
    edit(recipe)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r["parameters"].update(rho=1.5), r"rho \(preserved rank ratio\) must be in \(0, 1\], got 1.5"),
    (lambda r: r["models"][1]["parameters"].update(covariance="/nonexistent/c.safetensors"),
     r"model .*ft_task_1\): covariance file not found: /nonexistent/c.safetensors"),
    (lambda r: r["parameters"].update(target="wieght"), r"target: Input should be 'weight' or 'delta'"),
])
def test_mergekit_yaml_bad_parameter_is_one_line(demo, tmp_path, edit, expected):
    recipe = _bad_recipe(demo, tmp_path, edit)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([str(BIN / "mergekit-yaml"), str(recipe), str(tmp_path / "merged")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert re.search(r"pave recipe \(.*" + expected, proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr and "pydantic" not in proc.stderr, proc.stderr


def test_recipe_check_in_the_python_api_raises(demo, tmp_path):
    from mergekit.config import MergeConfiguration

    from mergekit.merge_methods import registry

    from pave_plugins.mergekit.recipe import RecipeParameterError, check_recipe

    recipe = yaml.safe_load(_bad_recipe(demo, tmp_path, lambda r: r["parameters"].update(rank_allocation="even")).read_text())
    with pytest.raises(RecipeParameterError, match=r"rank_allocation: Input should be 'spectral' or 'uniform'"):
        check_recipe(MergeConfiguration.model_validate(recipe), registry.get("pave"))
    check_recipe(MergeConfiguration.model_validate(yaml.safe_load((demo / "mergekit" / "pave_ties.yaml").read_text())),
                 registry.get("pave"))


def test_purify_log_names_no_inner_method(demo, tmp_path, caplog):
    """``pave purify`` runs no inner method: its summary line does not say ``inner=None``."""
    import logging

    caplog.set_level(logging.INFO)
    argv = ["purify", "--base", str(demo / "base")]
    for k in range(2):
        argv += ["--model", str(demo / f"ft_task_{k}"), "--covariance", str(demo / "covs" / f"task_{k}.safetensors")]
    assert main([*argv, "--out", str(tmp_path / "purified")]) == 0
    assert "purified 15 of 21 tensors" in caplog.text and "target=weight)" in caplog.text
    assert "inner=None" not in caplog.text

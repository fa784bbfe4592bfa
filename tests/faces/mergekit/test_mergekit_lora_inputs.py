"""LoRA adapters in a recipe (``model: base+lora``): mergekit merges each adapter into its model in a
folder given by ``--lora-merge-cache``. Without it a ``pave`` merge stops with one line naming the flag
(not mergekit's traceback "Need to specify cache dir to merge adapters"); with it the merge runs."""

from __future__ import annotations

import pytest
from mergekit_helpers import run_mergekit_yaml
from rethink_helpers import build_llama_lora

from pave_plugins.mergekit.recipe import RecipeParameterError, check_lora_cache


def recipe(tmp, adapters) -> str:
    models = "\n".join(f"  - model: {tmp / 'base'}+{p}\n    parameters: {{weight: 0.5}}" for p in adapters.values())
    return (f"merge_method: pave\nbase_model: {tmp / 'base'}\nmodels:\n{models}\n"
            "parameters: {inner: task_arithmetic}\ndtype: float32\n")


def test_lora_inputs_need_the_merge_cache_flag(tmp_path):
    adapters, _ = build_llama_lora(tmp_path)
    config = recipe(tmp_path, adapters)
    failed = run_mergekit_yaml(config, tmp_path / "no_cache")
    out = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "Traceback" not in out, out[-3000:]
    (line,) = [x for x in out.splitlines() if "--lora-merge-cache" in x]
    assert "ERROR" in line and "base+lora" in line and "Need to specify cache dir" not in out
    done = run_mergekit_yaml(config, tmp_path / "merged", "--lora-merge-cache", str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "merged" / "config.json").is_file() and any((tmp_path / "cache").iterdir())


def test_planning_check_names_the_flag(tmp_path):
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    adapters, _ = build_llama_lora(tmp_path)
    config = MergeConfiguration.model_validate(yaml.safe_load(recipe(tmp_path, adapters)))
    with pytest.raises(RecipeParameterError, match="pass --lora-merge-cache DIR"):
        check_lora_cache(config, MergeOptions())
    check_lora_cache(config, MergeOptions(lora_merge_cache=str(tmp_path / "c")))  # given: nothing to say

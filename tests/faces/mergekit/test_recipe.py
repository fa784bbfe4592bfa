"""The planning-time recipe checks of the mergekit face (``pave_plugins.mergekit.recipe``), on
``MergeConfiguration`` objects (no merge runs): where a covariance may go, the settings'
cross-checks, unknown names, the output folder, and the one-line report of a bad recipe."""

from __future__ import annotations

import logging
import sys

import pytest

from pave_plugins.mergekit.recipe import RecipeParameterError, anticipated, check_output_apart, check_recipe


def config(parameters=None, model_parameters=None, method="pave"):
    from mergekit.config import MergeConfiguration

    models = [{"model": m, "parameters": {"weight": 1.0, **(model_parameters or {}).get(m, {})}} for m in ("a", "b")]
    return MergeConfiguration.model_validate({"merge_method": method, "base_model": "base", "dtype": "float32",
                                              "models": models, "parameters": parameters or {}})


def method(name="pave"):
    from mergekit.merge_methods import registry

    return registry.get(name)


@pytest.mark.parametrize("parameters, pattern", [
    ({"damping_rule": "authors"}, r"damping_rule authors needs damping > 0"),
    ({"rho": 0.5, "gamma": 0.75}, r"gamma"),
    ({"rank_granularity": "tensor"}, r"rank_granularity: Input should be 'layer' or 'model'"),
    ({"damping": -0.1}, r"damping must be a finite number >= 0"),
])
def test_bad_settings_are_refused_at_planning_naming_the_parameter(parameters, pattern):
    with pytest.raises(RecipeParameterError, match=r"^pave recipe \(the recipe's global `parameters`\): .*" + pattern):
        check_recipe(config(parameters), method())


def test_the_authors_settings_pass_when_complete():
    check_recipe(config({"damping": 0.1, "damping_rule": "authors", "rank_granularity": "model"},
                        {"b": {"full_rank": True}}), method())


def test_a_covariance_belongs_to_one_model(tmp_path):
    with pytest.raises(RecipeParameterError, match="would give every model the same covariance"):
        check_recipe(config({"covariance": "c.safetensors"}), method())
    with pytest.raises(RecipeParameterError, match="is a folder"):
        check_recipe(config(model_parameters={"a": {"covariance": str(tmp_path)}}), method())


def test_an_unknown_parameter_warns_with_the_nearest_name(caplog):
    with caplog.at_level(logging.WARNING, logger="pave_plugins.mergekit"):
        check_recipe(config({"dampng": 0.1}), method())
    assert "unknown parameter 'dampng'" in caplog.text and "did you mean 'damping'?" in caplog.text


def test_other_methods_are_not_checked():
    check_recipe(config({"covariance": "c.safetensors"}, method="linear"), None)


def test_the_output_folder_may_not_be_a_model_folder(tmp_path):
    from mergekit.config import MergeConfiguration

    model = tmp_path / "ft"
    model.mkdir()
    cfg = MergeConfiguration.model_validate({"merge_method": "pave", "base_model": str(tmp_path / "base"),
                                             "models": [{"model": str(model)}], "dtype": "float32"})
    with pytest.raises(RecipeParameterError, match="pave recipe: "):
        check_output_apart(cfg, model / "merged")
    check_output_apart(cfg, tmp_path / "elsewhere")


def test_a_bad_recipe_is_one_line_without_traceback(caplog, capsys):
    from pave_plugins.mergekit.recipe import _excepthook

    seen = []
    hook = _excepthook(lambda *exc: seen.append(exc))
    exc = RecipeParameterError("pave recipe (x): rho must be in (0, 1]\nmore")
    assert anticipated(exc) and not anticipated(RuntimeError("a bug"))
    with caplog.at_level(logging.ERROR, logger="pave_plugins.mergekit"):
        hook(type(exc), exc, None)
    assert caplog.messages == ["pave recipe (x): rho must be in (0, 1]"] and not seen
    bug = RuntimeError("a bug")
    hook(type(bug), bug, None)
    assert seen and seen[0][1] is bug  # a real bug keeps its traceback
    assert sys.excepthook is not hook

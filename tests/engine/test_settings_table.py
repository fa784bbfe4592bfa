"""Each PAVE and RegMean setting is declared once (a row of its settings table) and every face
agrees with that row: mergekit's ParameterSpecs, the ``pave purify`` flags, the FusionBench
signature and shipped config. Adding a setting means one row; these tests name a face that lags."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from pave_plugins.engine.regmean import RegMeanSettings
from pave_plugins.engine.settings import PaveSettings, RethinkSettings, table

CONFIGS = Path(__file__).resolve().parents[2] / "pave_plugins" / "configs" / "method" / "pave"


def _specs(method) -> dict:
    return {p.name: p for p in method.spec.parameters}


@pytest.mark.parametrize("cls, method", [(PaveSettings, "pave"), (RegMeanSettings, "regmean")])
def test_mergekit_parameters_come_from_the_table(cls, method):
    from pave_plugins.mergekit import pave_merge_method, regmean_merge_method

    specs = _specs({"pave": pave_merge_method, "regmean": regmean_merge_method}[method])
    for row in table(cls):
        spec = specs.get(row.name_for("mergekit"))
        assert spec is not None, f"mergekit {method} has no parameter for {row.name}"
        if row.type is tuple:  # a list of models is a per-model flag in mergekit (a list there is a gradient)
            assert spec.scope.name == "NON_BASE" and spec.default is False, row.name
            continue
        assert spec.default == row.default_for("mergekit"), row.name


@pytest.mark.parametrize("cls, algorithm, config", [(PaveSettings, "PAVEAlgorithm", "pave.yaml"),
                                                    (RegMeanSettings, "RegMeanAlgorithm", "regmean.yaml"),
                                                    (RethinkSettings, "SpectralRethinking", "rethink.yaml")])
def test_fusion_bench_signature_and_config_agree_with_the_table(cls, algorithm, config):
    import pave_plugins.fusion_bench as fb

    from pave_plugins.fusion_bench.rethink import SpectralRethinking

    algorithms = {"SpectralRethinking": SpectralRethinking}
    params = inspect.signature(algorithms.get(algorithm) or getattr(fb, algorithm)).parameters
    shipped = yaml.safe_load((CONFIGS / config).read_text())
    for row in table(cls):
        name = row.name_for("fusion_bench")
        assert name in params, f"{algorithm} has no keyword {name}"
        assert params[name].default == row.default_for("fusion_bench"), name
        value = shipped.get(name, "absent")
        assert (tuple(value) if isinstance(value, list) else value) == row.default_for("fusion_bench"), f"{config}: {name}"


def test_pave_purify_has_a_flag_per_setting():
    import argparse

    from pave_plugins.cli import purify

    parser = argparse.ArgumentParser()
    purify.add_parser(parser.add_subparsers())
    sub = parser._subparsers._group_actions[0].choices["purify"]  # noqa: SLF001
    flags = {a.dest: a for a in sub._actions}  # noqa: SLF001
    for row in table(PaveSettings):
        if row.name == "on_fingerprint_mismatch":  # --allow-fingerprint-mismatch (warn) or the default (error)
            assert "allow_fingerprint_mismatch" in flags
            continue
        assert row.name in flags, row.name
        assert flags[row.name].default == row.default, row.name
        assert (tuple(flags[row.name].choices) if flags[row.name].choices else None) == row.choices, row.name


def _valid(row, value) -> bool:
    """The table's rule for one value, written out independently of check_table."""
    if value is None:
        return row.optional
    if row.choices is not None:
        return value in row.choices
    if row.type is bool:
        return isinstance(value, bool)
    if row.type is tuple:
        return isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    bounds = {"rho": lambda v: 0 < v <= 1, "gamma": lambda v: 0 <= v <= 1,
              "reduce_non_diagonal_ratio": lambda v: 0 <= v <= 1, "damping": lambda v: v >= 0}
    return bounds.get(row.name, lambda v: True)(value)


VALUES = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True),
                   st.integers(-3, 3), st.sampled_from(["spectral", "uniform", "weight", "delta", "float64", "float32",
                                                        "sum", "mean", "task_arithmetic", "warn", "error", "x",
                                                        "layer", "model", "relative", "authors"]),
                   st.lists(st.sampled_from(["m0", "m1"]), max_size=2), st.lists(st.integers(0, 2), min_size=1, max_size=2))


@pytest.mark.parametrize("cls", [PaveSettings, RegMeanSettings])
@given(data=st.data())
def test_every_setting_is_checked_once_by_its_row(cls, data):
    row = data.draw(st.sampled_from(table(cls)))
    value = data.draw(VALUES)
    kwargs = {row.name: value}
    if row.name == "gamma":
        kwargs["rho"] = 1.0  # gamma on its own; gamma < rho is PaveSettings' cross-check
    if row.name == "damping_rule":
        kwargs["damping"] = 0.1  # the authors' rule needs a starting eps (PaveSettings' cross-check)
    try:
        built = cls(**kwargs)
    except ValueError:
        assert not _valid(row, value) or (row.name == "gamma" and value == 1.0), (row.name, value)
        return
    assert _valid(row, value), f"{cls.__name__}({row.name}={value!r}) was accepted"
    if row.type is tuple:  # a face's list or one name, kept as a tuple
        value = (value,) if isinstance(value, str) else tuple(value)
    assert built.to_dict()[row.name] == value


def test_pave_rethink_has_a_flag_per_lora_dv_setting():
    import argparse

    from pave_plugins.cli import rethink

    parser = argparse.ArgumentParser()
    rethink.add_parser(parser.add_subparsers())
    sub = parser._subparsers._group_actions[0].choices["rethink"]  # noqa: SLF001
    flags = {a.dest: a for a in sub._actions}  # noqa: SLF001
    for row in table(RethinkSettings):
        assert row.name in flags, row.name
        assert flags[row.name].default == row.default, row.name
        assert flags[row.name].help == row.help, row.name


def test_lora_dv_settings_keep_the_core_records_defaults_and_rules():
    from pave_plugins.core.rethink import RethinkConfig

    core = RethinkConfig()
    built = RethinkSettings().config()
    for row in table(RethinkSettings):
        assert getattr(built, row.name) == getattr(core, row.name), row.name
    for name, bad in (("iterations", 0), ("epochs", -1), ("lr", -1.0), ("top_k", 0), ("samples", 0), ("batch_size", 0)):
        with pytest.raises(ValueError, match=name):
            RethinkSettings(**{name: bad})

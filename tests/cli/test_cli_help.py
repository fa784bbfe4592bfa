"""``pave --version`` and the help texts: defaults shown once and only where there is one, no reST
markup, ``pave bench --methods`` listing its keys, one report for a missing GPU in every command."""

from __future__ import annotations

import re
from importlib.metadata import version

import pytest
import torch

from pave_plugins.cli import build_parser, main


def help_of(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    return re.sub(r"\s+", " ", capsys.readouterr().out)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and out.startswith(f"pave {version('pave-plugins')} (")
    assert f"mergekit {version('mergekit')}" in out and f"FusionBench {version('fusion-bench')}" in out


@pytest.mark.parametrize("command", ["collect", "purify", "rethink", "demo", "bench"])
def test_help_shows_no_empty_or_doubled_default_and_no_markup(command, capsys):
    text = help_of(command, capsys)
    assert "(default: None)" not in text and "``" not in text
    formatter = subparser(command)._get_formatter()
    for action in options(command):
        assert action.help, f"pave {command} {action.option_strings[0]} has no help"
        shown = formatter._expand_help(action)  # the text the help shows for it
        assert shown.count("default") <= 1, (action.option_strings, shown)
        if action.required:
            assert "default" not in shown, (action.option_strings, shown)


def subparser(command: str):
    return build_parser()._subparsers._group_actions[0].choices[command]


def options(command: str) -> list:
    return [a for a in subparser(command)._actions if a.option_strings and a.dest != "help"]


def test_rethink_required_flags_and_lora_weights(capsys):
    text = help_of("rethink", capsys)
    assert "--base BASE pre-trained model folder (theta_pre) --merged" in text
    assert "weights of the weighted sum (default 1 each) --calib" in text


def test_bench_help_lists_method_keys_and_the_bootstrap(capsys):
    from pave_plugins.bench.methods import BASE_METHODS

    assert "paired bootstrap" in help_of("bench", capsys)
    (methods,) = [a.help for a in options("bench") if a.dest == "methods"]
    for key in BASE_METHODS:
        assert f" {key} " in methods or f" {key};" in methods, key
    assert "loradv_{ce,entropy}_{ta,ties}" in methods and "pave_{weight,delta}_{spectral,uniform}" in methods


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_missing_gpu_is_reported_alike(capsys):
    said = {}
    for command in (["bench"], ["purify", "--base", "b", "--model", "m", "--covariance", "c", "--out", "o"]):
        with pytest.raises(SystemExit) as exc:
            main([*command, "--device", "cuda"])
        assert exc.value.code == 2
        said[command[0]] = capsys.readouterr().err.strip().splitlines()[-1].split("error: ", 1)[1]
    assert said["bench"] == said["purify"] and "no CUDA device here" in said["bench"]

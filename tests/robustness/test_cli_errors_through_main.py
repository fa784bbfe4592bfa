"""Every bad-input case of ``test_robustness_inputs`` that is a ``pave`` command, run through the real
entry point ``pave_plugins.cli.main``: exit status 2, one ``ERROR pave`` log line whose text matches
the case's pattern (it names the file / tensor / layer at fault), and the output left as it was."""

from __future__ import annotations

import inspect
import logging
import re

import pytest
import test_robustness_inputs as matrix

from pave_plugins.cli import main

CLI_CASES = [
    key for key, make in matrix.CASES.items() if "cli(" in inspect.getsource(make)
]


class MainFailed(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def test_most_cases_are_commands():
    assert len(CLI_CASES) >= 25


@pytest.mark.parametrize("key", CLI_CASES)
def test_bad_input_through_main(env, tmp_path, key, monkeypatch, caplog):  # noqa: F811
    def via_main(argv):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="pave"):
            code = main(argv)
        errors = [
            r.getMessage()
            for r in caplog.records
            if r.name == "pave" and r.levelno == logging.ERROR
        ]
        raise MainFailed(code, "\n".join(errors))

    monkeypatch.setattr(matrix, "cli", via_main)
    case = matrix.CASES[key](env, tmp_path)
    before = matrix.snapshot(case.out) if case.out is not None else None
    with pytest.raises(MainFailed) as err:
        case.run()
    assert err.value.code == 2, key
    assert re.search(case.pattern, str(err.value), flags=re.DOTALL), (
        f"{key}: {err.value}\npattern: {case.pattern}"
    )
    if case.out is not None:
        assert matrix.snapshot(case.out) == before, f"{key}: output changed"
        assert matrix.temp_siblings(case.out) == []

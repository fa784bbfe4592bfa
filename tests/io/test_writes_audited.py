"""Every write a command makes goes through the output transaction, watched as it happens.

An audit hook (:func:`sys.addaudithook`) sees every file the Python process opens for writing,
creates, renames, links, changes or removes. While a command runs, each such event under the test's
folder must be inside a staging sibling of the transaction (``.NAME.pave-PID-TOKEN.new``), or be
the transaction publishing one (a rename or link whose source is a staging sibling), or create the
folder an output goes into; no event may touch an input. Run on ``pave purify``, ``pave collect``,
``pave rethink``, ``pave demo`` (which also runs mergekit), each over an earlier output.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from outputs_helpers import pave, purify_args, rethink_args

STAGE = re.compile(r"^\..+\.pave-\d+-[0-9a-f]{8}\.(new|old)$")
_WATCH: list[dict] = []  # the active watch, if any (an audit hook cannot be removed)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _path(p) -> Path | None:
    if isinstance(p, int) or p is None:
        return None
    return Path(os.path.abspath(os.fsdecode(p)))


def _hook(event: str, args) -> None:
    if not _WATCH:
        return
    w = _WATCH[-1]
    if event == "open":
        path, mode, flags = args
        if (mode and any(c in mode for c in "wax+")) or (flags and flags & _WRITE_FLAGS):
            w["events"].append(("write", _path(path), None))
    elif event in ("os.rename", "os.link", "shutil.copyfile", "shutil.copytree", "shutil.move"):
        w["events"].append((event, _path(args[1]), _path(args[0])))
    elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.truncate", "os.utime", "shutil.rmtree",
                   "os.symlink", "os.chown"):
        w["events"].append((event, _path(args[0] if event != "os.symlink" else args[1]), None))


sys.addaudithook(_hook)


def _in_stage(p: Path) -> bool:
    return any(STAGE.match(part) for part in p.parts)


def watched(run, *, root: Path, inputs: list[Path], outputs: list[Path]) -> list[str]:
    """Run ``run()`` under the hook; the events under ``root`` that break the rule, as text."""
    _WATCH.append({"events": []})
    try:
        run()
    finally:
        events = _WATCH.pop()["events"]
    ins = [Path(os.path.realpath(i)) for i in inputs]
    outs = [Path(os.path.realpath(o)) for o in outputs]
    bad = []
    for kind, dst, src in events:
        if dst is None:
            continue
        dst = Path(os.path.realpath(dst))
        if any(dst == i or dst.is_relative_to(i) for i in ins):
            bad.append(f"{kind} on the input {dst}")
            continue
        if not dst.is_relative_to(root) or _in_stage(dst):
            continue
        if src is not None and _in_stage(Path(os.path.realpath(src))) and dst in outs:
            continue  # publishing a stage at the output, or rolling back a killed swap
        if kind == "os.mkdir" and any(o.is_relative_to(dst) for o in outs):
            continue  # the folder an output goes into
        bad.append(f"{kind} {dst}" + (f" from {src}" if src else ""))
    return bad


def _old_output(path: Path, who: str) -> None:
    from pave_plugins.io.output import output_folder

    with output_folder(path, who=who) as stage:
        (stage / "old.txt").write_text("old")


def _snap(*paths: Path) -> dict:
    from inputs_helpers import snapshot

    return {str(p): snapshot(p) for p in paths}


def test_pave_purify_writes_only_through_the_transaction(fam, tmp_path, capsys, caplog):  # noqa: F811
    out = tmp_path / "a" / "purified"
    _old_output(out, "pave purify")
    inputs = [fam["base"], *fam["fts"], *fam["covs"]]
    before = _snap(*inputs)
    result = {}
    bad = watched(lambda: result.update(r=pave(purify_args(fam, out, None, None, "--overwrite"), capsys, caplog)),
                  root=tmp_path, inputs=inputs, outputs=[out])
    assert result["r"][0] == 0 and not bad, bad
    assert _snap(*inputs) == before and not (out / "old.txt").exists()


def test_pave_collect_writes_only_through_the_transaction(col, tmp_path, capsys, caplog):  # noqa: F811
    out = tmp_path / "c.safetensors"
    argv = ["collect", "--model", col["model"], "--data", col["data"], "--no-progress", "--device", "cpu", "-o", out]
    assert pave(argv, capsys, caplog)[0] == 0
    before = _snap(col["model"], col["data"])
    result = {}
    bad = watched(lambda: result.update(r=pave([*argv, "--overwrite", "--seed", "3"], capsys, caplog)),
                  root=tmp_path, inputs=[col["model"], col["data"]], outputs=[out])
    assert result["r"][0] == 0 and not bad, bad
    assert _snap(col["model"], col["data"]) == before


def test_pave_rethink_writes_only_through_the_transaction(seq, tmp_path, capsys, caplog):  # noqa: F811
    out = tmp_path / "rethought"
    _old_output(out, "pave rethink")
    inputs = [seq["root"]]
    before = _snap(*inputs)
    result = {}
    bad = watched(lambda: result.update(r=pave(rethink_args(seq, out, "--overwrite"), capsys, caplog)),
                  root=tmp_path, inputs=inputs, outputs=[out])
    assert result["r"][0] == 0 and not bad, bad
    assert _snap(*inputs) == before


@pytest.mark.parametrize("earlier", [False, True])
def test_pave_demo_writes_only_through_the_transaction(tmp_path, capsys, caplog, earlier):
    out = tmp_path / "demo"
    if earlier:
        _old_output(out, "pave demo")
    result = {}
    argv = ["demo", "--tasks", "2", "--steps", "3", "--out", out, *(["--overwrite"] if earlier else [])]
    bad = watched(lambda: result.update(r=pave(argv, capsys, caplog)), root=tmp_path, inputs=[], outputs=[out])
    assert result["r"][0] == 0 and not bad, bad
    assert (out / "mergekit" / "pave_ta.yaml").is_file() and not (out / "old.txt").exists()
    # the recipes name the folder where it is, not where it was built
    assert str(out.resolve()) in (out / "mergekit" / "pave_ta.yaml").read_text()
    staged = re.compile(r"\.demo\.pave-\d+-[0-9a-f]{8}")
    assert not [p for p in out.rglob("*") if p.is_file() and staged.search(p.read_bytes().decode("latin-1"))]


def test_the_watch_sees_writes_that_bypass_the_transaction(tmp_path):
    """The rule can fail: a direct write, a rename into place and a removal are all reported."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "m.json").write_text("{}")

    def bypass():
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "f").write_text("x")
        os.rename(tmp_path / "out" / "f", tmp_path / "out" / "g")
        (tmp_path / "in" / "m.json").unlink()

    bad = watched(bypass, root=tmp_path, inputs=[tmp_path / "in"], outputs=[tmp_path / "declared"])
    assert [b.split()[0] for b in bad] == ["os.mkdir", "write", "os.rename", "os.remove"], bad

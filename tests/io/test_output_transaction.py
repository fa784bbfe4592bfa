"""The one output transaction (:mod:`pave_plugins.io.output`), tried on generated situations.

Each property is checked on layouts, kill points, umasks and write failures that hypothesis
generates (a bounded number in CI; ``PAVE_HYPOTHESIS=long`` runs many more, see the README):

- an earlier output with anything added, changed or linked anywhere in its tree is refused with
  the entry named, and nothing changes; an untouched one is replaced by exactly the new output;
- an output that is, contains or lies inside an input, at any depth and through symbolic links on
  either side, is refused naming the input, and no input byte changes; a linked output is written
  at the link's target and the link stays;
- a process killed at any step of the transaction leaves the old output or the complete new one at
  the path, and the next transaction on the path leaves no staging sibling behind;
- every file and folder has the permissions of the umask, whatever wrote it (safetensors too);
- a write that fails at any byte (the file-size limit, which stops every writer, Rust included,
  with EFBIG) is one :class:`OutputWriteError` naming the output; the old output is intact and no
  temporary is left;
- distinct inputs get distinct output names.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import stat
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pave_plugins.io import output as out_mod
from pave_plugins.io.output import (
    MANIFEST,
    OutputError,
    OutputWriteError,
    distinct_names,
    output_file,
    output_folder,
)

WHO = "pave test"
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# names as users and libraries write them: look-alikes of what the commands write, nested folders
NAMES = st.sampled_from(["config.json", "model.safetensors", "tokenizer.json", "tokenizer_NOTES.txt", "vocab.txt",
                         "vocab_frequencies.csv", "notes.model", "README.md", "my_eval_results.json", "x",
                         ".hidden", "checkpoints", "ft_task_0", "pave_rank_report.json", "rethink.json"])
REL = st.lists(NAMES, min_size=1, max_size=3).map(lambda parts: "/".join(parts))
CONTENT = st.binary(min_size=0, max_size=64)


def tree(root: Path) -> dict[str, object]:
    """Every entry under ``root``: files by content, links by target, folders as None."""
    found: dict[str, object] = {}
    if not os.path.lexists(root):
        return found
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath) / n
            rel = p.relative_to(root).as_posix()
            found[rel] = ("link", os.readlink(p)) if p.is_symlink() else (None if p.is_dir() else p.read_bytes())
    return found


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        if any(q.is_file() for q in [*p.parents][: len(Path(rel).parts) - 1]):
            continue  # a file already holds a parent's name
        if p.is_dir():
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".pave-" in p.name)


def fresh(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    if d.exists():
        import shutil

        shutil.rmtree(d)
    d.mkdir()
    return d


# ------------------------------------------------------------------------------ ownership
MODS = st.sampled_from(["none", "add file", "add folder", "change same size", "change size", "link out", "link dir"])


@FAST
@given(old=st.dictionaries(REL, CONTENT, min_size=1, max_size=6), new=st.dictionaries(REL, CONTENT, max_size=4),
       mod=MODS, where=REL, data=st.data())
def test_overwrite_replaces_exactly_what_the_command_wrote(tmp_path, old, new, mod, where, data):
    work = fresh(tmp_path, "w")
    out = work / "out"
    with output_folder(out, who=WHO) as stage:
        write_tree(stage, old)
    owned_files = [rel for rel, v in tree(out).items() if isinstance(v, bytes) and rel != MANIFEST]
    target = out / where
    if mod == "add file":
        assume(not os.path.lexists(target) and not any(q.is_file() for q in target.parents))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"the user's")
    elif mod == "add folder":
        assume(not os.path.lexists(target) and not any(q.is_file() for q in target.parents))
        target.mkdir(parents=True)
    elif mod in ("change same size", "change size"):
        rel = data.draw(st.sampled_from(owned_files))
        p = out / rel
        body = p.read_bytes()
        changed = bytes(b ^ 1 for b in body) if mod == "change same size" else body + b"!"
        assume(changed != body)
        p.write_bytes(changed)
        where = rel
    elif mod in ("link out", "link dir"):
        assume(not os.path.lexists(target) and not any(q.is_file() for q in target.parents))
        target.parent.mkdir(parents=True, exist_ok=True)
        (work / "elsewhere").mkdir(exist_ok=True)
        os.symlink(work / "elsewhere" if mod == "link dir" else work / "elsewhere" / "f", target)
    before = tree(out)
    if mod == "none":
        with output_folder(out, who=WHO, overwrite=True) as stage:
            write_tree(stage, new)
        ref = fresh(tmp_path, "ref")
        write_tree(ref, new)
        assert {k: v for k, v in tree(out).items() if k != MANIFEST} == tree(ref)
    else:
        with pytest.raises(OutputError) as err:
            with output_folder(out, who=WHO, overwrite=True) as stage:
                write_tree(stage, new)
        shown = where.split("/")
        assert any("/".join(shown[: i + 1]) in str(err.value) for i in range(len(shown))), str(err.value)
        assert tree(out) == before
    assert siblings(work) == []


def test_an_output_of_another_command_or_without_a_record_is_refused(tmp_path):
    out = tmp_path / "out"
    with output_folder(out, who="pave rethink") as stage:
        (stage / "a").write_text("1")
    with pytest.raises(OutputError, match="is an output of pave rethink, not of pave purify"):
        with output_folder(out, who="pave purify", overwrite=True):
            pass
    (out / MANIFEST).unlink()
    with pytest.raises(OutputError, match=f"has no readable {MANIFEST}"):
        with output_folder(out, who="pave rethink", overwrite=True):
            pass
    assert (out / "a").read_text() == "1"


# ------------------------------------------------------------------- outputs and inputs
RELATION = st.sampled_from(["is", "inside", "contains", "via link to input", "link inside input", "apart"])


@FAST
@given(depth=st.integers(0, 3), rel=RELATION, as_file=st.booleans(), overwrite=st.booleans())
def test_an_output_is_never_an_input_nor_inside_nor_around_one(tmp_path, depth, rel, as_file, overwrite):
    work = fresh(tmp_path, "w")
    model = work / "models" / "m"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "w.bin").write_bytes(b"weights")
    deep = model.joinpath(*["d"] * depth)
    os.symlink(model, work / "link")
    path = {"is": model, "inside": deep / "o", "contains": work / "models", "via link to input": work / "link",
            "link inside input": work / "link" / "o", "apart": work / "elsewhere" / "o"}[rel]
    before = tree(work / "models")
    inputs = {"--model": [model]}
    if rel == "apart":
        with (output_file if as_file else output_folder)(path, who=WHO, inputs=inputs, overwrite=overwrite) as stage:
            stage.write_text("ok") if as_file else (stage / "f").write_text("ok")
        assert path.exists()
    else:
        with pytest.raises(OutputError, match=rf"(is|contains|lies inside) the input --model {re.escape(str(model))}"):
            with (output_file if as_file else output_folder)(path, who=WHO, inputs=inputs, overwrite=overwrite) as s:
                s.write_text("never") if as_file else (s / "f").write_text("never")
    assert tree(work / "models") == before
    assert siblings(work) == [] and siblings(model) == []


def test_a_linked_output_is_written_at_its_target(tmp_path):
    real = tmp_path / "disk2" / "out"
    with output_folder(real, who=WHO) as stage:
        (stage / "old").write_text("old")
    os.symlink(real, tmp_path / "link")
    with output_folder(tmp_path / "link", who=WHO, overwrite=True) as stage:
        (stage / "new").write_text("new")
    assert (tmp_path / "link").is_symlink() and os.readlink(tmp_path / "link") == str(real)
    assert sorted(p.name for p in real.iterdir()) == [MANIFEST, "new"]


# ------------------------------------------------------------------------ kill points
STEPS = st.sampled_from(["body", "built", "sealed", "exchanged", "moved-old", "moved-new", "done"])


def _in_child(fn) -> int:
    """Run ``fn`` in a forked process; its exit status (a kill point calls ``os._exit(137)``)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            fn()
            code = 0
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@FAST
@given(step=STEPS, exchange=st.booleans(), had_old=st.booleans(), as_file=st.booleans(),
       files=st.dictionaries(REL, CONTENT, min_size=1, max_size=4))
def test_a_kill_at_any_step_leaves_the_old_or_the_new_output(tmp_path, step, exchange, had_old, as_file, files):
    work = fresh(tmp_path, "w")
    out = work / "out"
    if had_old:
        with (output_file if as_file else output_folder)(out, who=WHO) as stage:
            stage.write_bytes(b"old") if as_file else (stage / "old.txt").write_bytes(b"old")
    old = tree(out) if not as_file else (out.read_bytes() if had_old else None)

    def write():
        def hook(name):
            if name == step:
                os._exit(137)

        out_mod.step_hook, out_mod.use_exchange = hook, exchange
        with (output_file if as_file else output_folder)(out, who=WHO, overwrite=True) as stage:
            if as_file:
                stage.write_bytes(b"new")
            else:
                write_tree(stage, files)
            if step == "body":
                os._exit(137)

    code = _in_child(write)
    assert code in (0, 137)
    new_tree = {k: v for k, v in tree(out).items() if k != MANIFEST}
    if as_file:
        assert (out.read_bytes() if out.exists() else None) in (old, b"new")
    else:
        complete = bool(new_tree) and (out / MANIFEST).is_file() and "old.txt" not in new_tree
        if code == 137 and step == "moved-old" and had_old and not exchange:
            # the one gap of a system without an atomic exchange: the old output sits aside and the
            # next run on the path puts it back (below: that run starts with the rollback)
            (aside,) = [work / n for n in siblings(work) if n.endswith(".old")]
            assert not os.path.lexists(out) and tree(aside) == old
            out_mod.check_output(out, who=WHO, overwrite=True)
        assert tree(out) == old or complete or (not had_old and not os.path.lexists(out)), new_tree
    # the next run on the path recovers: no staging sibling is left, the path holds old or new
    with (output_file if as_file else output_folder)(out, who=WHO, overwrite=True) as stage:
        stage.write_bytes(b"next") if as_file else (stage / "next.txt").write_bytes(b"next")
    assert siblings(work) == []
    assert (out.read_bytes() == b"next") if as_file else (out / "next.txt").read_bytes() == b"next"


def test_a_killed_two_rename_swap_is_rolled_back(tmp_path):
    """Killed between "old moved aside" and "new moved in": the next run restores the old output."""
    out = tmp_path / "out"
    with output_folder(out, who=WHO) as stage:
        (stage / "old.txt").write_text("old")

    def write():
        out_mod.use_exchange = False
        out_mod.step_hook = lambda name: os._exit(137) if name == "moved-old" else None
        with output_folder(out, who=WHO, overwrite=True) as stage:
            (stage / "new.txt").write_text("new")

    assert _in_child(write) == 137
    assert not out.exists() and any(n.endswith(".old") for n in siblings(tmp_path))
    out_mod.check_output(out, who=WHO, overwrite=True)  # what every run does first
    assert (out / "old.txt").read_text() == "old" and siblings(tmp_path) == []


def test_a_live_run_on_the_same_path_is_not_disturbed(tmp_path):
    out = tmp_path / "out"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child holds a transaction open until told to go
        os.close(w)
        with output_folder(out, who=WHO) as stage:
            (stage / "a").write_text("child")
            os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        import time

        for _ in range(200):
            if siblings(tmp_path):
                break
            time.sleep(0.01)
        with pytest.raises(OutputError, match=rf"is being written by another run \(process {pid}\)"):
            with output_folder(out, who=WHO, overwrite=True):
                pass
    finally:
        os.write(w, b"x")
        os.waitpid(pid, 0)
    assert (out / "a").read_text() == "child" and siblings(tmp_path) == []


# ------------------------------------------------------------------------------ umask
def _modes(root: Path) -> set[tuple[bool, int]]:
    found = {(True, stat.S_IMODE(root.stat().st_mode))} if root.is_dir() else {(False, stat.S_IMODE(root.stat().st_mode))}
    for _, p, is_dir in out_mod._walk(root) if root.is_dir() else []:
        found.add((is_dir, stat.S_IMODE(p.lstat().st_mode)))
    return found


@FAST
@given(mask=st.sampled_from([0o022, 0o027, 0o077, 0o002, 0o007]), as_file=st.booleans())
def test_every_file_and_folder_gets_the_umask(tmp_path, mask, as_file):
    from safetensors.numpy import save_file

    work = fresh(tmp_path, "w")
    old = os.umask(mask)
    try:
        path = work / ("c.safetensors" if as_file else "out")
        with (output_file if as_file else output_folder)(path, who=WHO) as stage:
            if as_file:
                save_file({"c": np.eye(3)}, str(stage))  # safetensors writes 0600 through its own temp file
            else:
                (stage / "sub").mkdir(mode=0o700)
                save_file({"c": np.eye(3)}, str(stage / "sub" / "m.safetensors"))
                (stage / "r.json").write_text("{}")
                os.chmod(stage / "r.json", 0o600)
    finally:
        os.umask(old)
    expect = {(False, 0o666 & ~mask)} if as_file else {(True, 0o777 & ~mask), (False, 0o666 & ~mask)}
    assert _modes(path) == expect


# ----------------------------------------------------------------------- write failures
@settings(deadline=None, max_examples=max(5, settings().max_examples // 3),
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limit=st.integers(0, 4000), as_file=st.booleans(), rust=st.booleans())
def test_a_write_failing_at_any_byte_is_one_error_and_keeps_the_old_output(tmp_path, limit, as_file, rust):
    from safetensors.numpy import save_file

    work = fresh(tmp_path, "w")
    path = work / ("c.safetensors" if as_file else "out")
    with (output_file if as_file else output_folder)(path, who=WHO) as stage:
        stage.write_bytes(b"old") if as_file else (stage / "old.txt").write_bytes(b"old")
    before = tree(path) if not as_file else path.read_bytes()
    big = {"c": np.arange(600, dtype=np.float64)}  # 4.8 kB: larger than any limit drawn
    report = work / "report.json"

    def write():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        try:
            with (output_file if as_file else output_folder)(path, who=WHO, overwrite=True) as stage:
                target = stage if as_file else stage / "m.safetensors"
                if rust:
                    save_file(big, str(target))
                else:
                    target.write_bytes(np.asarray(big["c"]).tobytes())
        except OutputWriteError as exc:
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            report.write_text(json.dumps({"error": str(exc)}))
            os._exit(2)

    code = _in_child(write)
    assert code == 2, code
    msg = json.loads(report.read_text())["error"]
    assert msg.startswith(f"cannot write --out {path}: File too large") and "\n" not in msg
    assert (tree(path) if not as_file else path.read_bytes()) == before
    assert siblings(work) == []


def test_an_error_about_an_input_is_not_reported_as_a_write_failure(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        with output_folder(tmp_path / "out", who=WHO):
            open(tmp_path / "no-such-model")
    assert not (tmp_path / "out").exists() and siblings(tmp_path) == []


# ------------------------------------------------------------------------------- names
@FAST
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c/d"]),
                          st.sampled_from(["ft", "ft_1", "FT", "ft_2", "m", "report.json", "Report.JSON"])),
                min_size=1, max_size=8))
def test_distinct_inputs_get_distinct_output_names(tmp_path, pairs):
    reserved = ("report.json", MANIFEST)
    paths = [tmp_path / parent / name for parent, name in pairs]
    names = distinct_names(paths, reserved=reserved)
    folded = [n.casefold() for n in names]
    assert len(set(folded)) == len(paths) and not set(folded) & {r.casefold() for r in reserved}
    assert all(n == p.name or n.startswith(p.name + "_") for n, p in zip(names, paths))
    # a name no other input has, and the command does not use, is kept as it is
    for n, p in zip(names, paths):
        if [q.name.casefold() for q in paths].count(p.name.casefold()) == 1 and p.name.casefold() != "report.json":
            assert n == p.name

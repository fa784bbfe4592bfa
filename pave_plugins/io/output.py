"""One output transaction for every file and folder this package writes.

Every command and face writes through :func:`output_folder` or :func:`output_file` (a folder it
fills file by file over a long run, the benchmark's, through :class:`OwnedFolder`):

1. The output path is resolved (symbolic links followed: a linked output is written at its target,
   the link stays) and refused when it is, contains or lies inside any input.
2. An existing output is replaced only with ``overwrite``. A folder is replaced only when its
   ownership record (:data:`MANIFEST`: every file and folder the command wrote, with sizes, times
   and, up to 64 MiB, SHA-256) still describes everything in it: a file or folder anywhere in the
   tree that the command did not write, or one that changed since, is named and nothing is touched.
3. The output is built in a hidden sibling ``.NAME.pave-PID-TOKEN.new`` and swapped in with one
   atomic exchange (``renameat2(RENAME_EXCHANGE)``; where the system has none, two renames), so a
   kill at any instant leaves the old output or the new one at the path. The next run on that path
   rolls back or finishes an interrupted swap and removes what dead runs left behind.
4. Every file and folder gets the permissions the user's umask gives (set after the libraries wrote
   them: ``safetensors`` writes through a temporary file of its own, mode 0600).
5. An ``OSError`` while writing (no space, quota, read-only, file too large) becomes
   :class:`OutputWriteError` naming the output; the previous output is intact, no temporary is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

log = logging.getLogger(__name__)

#: the ownership record inside every output folder
MANIFEST = ".pave-output.json"
_FORMAT = "pave_plugins output"
_HASH_LIMIT = 64 * 2**20  # larger files are recognised by size and modification time
_STAGE = re.compile(r"^\.(?P<name>.+)\.pave-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})\.(?P<kind>new|old)$")
# errors that say the output cannot be written, whatever file they name
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO}
_UMASK_LOCK = threading.Lock()
_MANIFEST_LOCK = threading.Lock()
_LIVE: set[Path] = set()  # this process's stagings in progress (other threads' are not leftovers)
_LIVE_LOCK = threading.Lock()

Inputs = Mapping[str, Iterable["str | os.PathLike | None"]]


class OutputError(FileExistsError):
    """An output would replace or sit inside an input, or something the command did not write."""


class OutputWriteError(OSError):
    """The output could not be written (disk full, read-only, ...); the previous one is intact.
    ``errno`` is the system's code; the message (``strerror``) names the output."""

    def __str__(self) -> str:
        return str(self.strerror)


def _no_step(step: str) -> None:
    return None


#: called with the name of each step of a transaction; tests replace it to kill the process there
step_hook: Callable[[str], None] = _no_step


def _step(name: str) -> None:
    step_hook(name)


# ------------------------------------------------------------------------------------- paths
def umask() -> int:
    """The process umask (read without changing it where the system allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o022)
        os.umask(old)
    return old


def resolve(path: str | os.PathLike) -> Path:
    """The path an output is written at: user folder expanded, every symbolic link followed."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def check_apart(out: str | os.PathLike, inputs: Inputs | None, *, out_flag: str = "--out") -> None:
    """Refuse an output that is, contains, or lies inside any input (symbolic links resolved on both
    sides). ``inputs`` maps a flag (``"--model"``) to the paths given with it."""
    target = resolve(out)
    for flag, paths in (inputs or {}).items():
        for p in paths:
            if p is None or str(p) == "":
                continue
            src = resolve(p)
            if src == target:
                how = "is"
            elif src.is_relative_to(target):
                how = "contains"
            elif target.is_relative_to(src):
                how = "lies inside"
            else:
                continue
            raise OutputError(f"{out_flag} {out} {how} the input {flag} {p}: an output never replaces or goes "
                              f"inside an input; choose another {out_flag}")


def check_writable(path: str | os.PathLike) -> None:
    """Fail early (``PermissionError`` naming the path) when ``path`` could not be written later.

    Creates nothing: the nearest existing ancestor must be a writable directory.
    """
    path = resolve(path)
    anc = path.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise PermissionError(f"cannot write {path}: {anc} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: {anc} is not writable")


def distinct_names(paths: Iterable[str | os.PathLike], reserved: Iterable[str] = ()) -> list[str]:
    """One output name per input, distinct even on a case-insensitive file system and from the
    ``reserved`` names (the command's own files): the input's own folder name when no other input
    has it, else that name with the smallest free ``_k`` suffix."""
    bases = [resolve(p).name or "model" for p in paths]
    counts: dict[str, int] = {r.casefold(): 2 for r in reserved}  # a reserved name always collides
    for b in bases:
        counts[b.casefold()] = counts.get(b.casefold(), 0) + 1
    taken = {r.casefold() for r in reserved} | {b.casefold() for b in bases if counts[b.casefold()] == 1}
    names = []
    for b in bases:
        name, k = b, 0
        while counts[b.casefold()] > 1 and name.casefold() in taken:
            k += 1
            name = f"{b}_{k}"
        taken.add(name.casefold())
        names.append(name)
    return names


# ----------------------------------------------------------------------------- ownership
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_entry(path: Path) -> dict:
    st = path.lstat()
    entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if st.st_size <= _HASH_LIMIT and not path.is_symlink():
        entry["sha256"] = _sha256(path)
    return entry


def _walk(folder: Path) -> Iterator[tuple[str, Path, bool]]:
    """(relative name, path, is a folder) of everything under ``folder``; links are not followed."""
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        for d in dirs:
            yield (rel / d).as_posix(), Path(root) / d, not os.path.islink(Path(root) / d)
        for f in files:
            yield (rel / f).as_posix(), Path(root) / f, False


def ownership_record(folder: Path, who: str) -> dict:
    """What :data:`MANIFEST` holds: every file and folder under ``folder`` as ``who`` wrote it."""
    files, dirs = {}, []
    for rel, p, is_dir in _walk(folder):
        if is_dir:
            dirs.append(rel)
        elif rel != MANIFEST:
            files[rel] = _file_entry(p)
    return {"format": _FORMAT, "version": 1, "writer": who, "dirs": sorted(dirs), "files": files}


def _unchanged(path: Path, entry: Mapping) -> bool:
    st = path.lstat()
    if st.st_size != entry.get("size"):
        return False
    if "sha256" in entry:
        return _sha256(path) == entry["sha256"]
    return st.st_mtime_ns == entry.get("mtime_ns")


def read_record(folder: Path) -> dict | None:
    """The ownership record of ``folder``, or None when it has none (or an unreadable one)."""
    try:
        rec = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(rec, dict) and rec.get("format") == _FORMAT and isinstance(rec.get("files"), dict)
    return rec if ok and isinstance(rec.get("dirs"), list) else None


def foreign_entries(folder: Path, rec: Mapping) -> list[str]:
    """Everything under ``folder`` that the record does not describe as it is now (folders end in /)."""
    files, dirs = rec["files"], set(rec["dirs"])
    odd = []
    for rel, p, is_dir in _walk(folder):
        if rel == MANIFEST:
            continue
        if is_dir:
            if rel not in dirs:
                odd.append(rel + "/")
        elif not (rel in files and isinstance(files[rel], Mapping) and _unchanged(p, files[rel])):
            odd.append(rel)
    return sorted(odd)


def check_replaceable(folder: Path, who: str, *, flag: str = "--out", shown: str | None = None) -> None:
    """``folder`` may be replaced by ``who`` only if its ownership record is ``who``'s and describes
    every entry of the tree as it is now; else :class:`OutputError` naming what is not ``who``'s."""
    shown = shown or str(folder)
    rec = read_record(folder)
    if rec is None:
        raise OutputError(f"{flag} {shown} is not an earlier output of {who} (it has no readable {MANIFEST}): "
                          f"--overwrite replaces only those; move it away or choose another {flag}")
    if rec.get("writer") != who:
        raise OutputError(f"{flag} {shown} is an output of {rec.get('writer')}, not of {who}: --overwrite replaces "
                          f"only an earlier output of {who}; choose another {flag}")
    odd = foreign_entries(folder, rec)
    if odd:
        more = f" and {len(odd) - 3} more" if len(odd) > 3 else ""
        raise OutputError(f"{flag} {shown} holds {', '.join(odd[:3])}{more}, which {who} did not write or which changed "
                          f"since: --overwrite replaces only what {who} wrote; move them away or choose another {flag}")


# ------------------------------------------------------------------------------ recovery
def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover from an earlier transaction of this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def recover(target: Path, *, flag: str = "--out", shown: str | None = None) -> None:
    """Finish or roll back a swap at ``target`` interrupted by a kill, and remove what dead runs left;
    refuse while another live run is writing ``target``."""
    try:
        siblings = [(e, _STAGE.match(e.name)) for e in target.parent.iterdir()]
    except OSError:
        return
    with _LIVE_LOCK:
        live = set(_LIVE)
    mine = [(e, m) for e, m in siblings if m and m["name"] == target.name and e not in live]
    for e, m in mine:
        if _alive(int(m["pid"])):
            raise OutputError(f"{flag} {shown or target} is being written by another run (process {m['pid']}): "
                              f"wait for it to finish or choose another {flag}")
    for e, m in sorted(mine, key=lambda em: em[1]["kind"] != "old"):
        if m["kind"] == "old" and not os.path.lexists(target):
            os.rename(e, target)  # killed between the two renames: the old output goes back
            log.warning("%s: restored the previous output (a run writing it was interrupted)", shown or target)
        else:
            _remove(e)


# ---------------------------------------------------------------------------- the swap
def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


#: tests set this to False to exercise the two-rename swap of systems without ``renameat2``
use_exchange = True


def _swap_folder(stage: Path, target: Path, old: Path, shown: str) -> None:
    """Move the complete ``stage`` to ``target``; the old output ends in ``stage`` or ``old``."""
    if not os.path.lexists(target):
        try:
            os.rename(stage, target)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise _appeared(shown) from None
            raise
        return
    if use_exchange and _exchange(stage, target):
        _step("exchanged")
        return
    os.rename(target, old)
    _step("moved-old")
    os.rename(stage, target)
    _step("moved-new")


def _publish_file(stage: Path, target: Path, overwrite: bool, shown: str) -> None:
    if overwrite:
        os.replace(stage, target)
        return
    try:
        os.link(stage, target)  # atomic, and fails when another run created the path meanwhile
    except FileExistsError:
        raise _appeared(shown) from None
    except OSError:  # no hard links on this file system
        if os.path.lexists(target):
            raise _appeared(shown) from None
        os.replace(stage, target)


def _appeared(shown: str) -> OutputError:
    return OutputError(f"{shown} appeared while this run was writing it (another run writing the same output?): "
                       "it was left as it is and this run's result discarded; rerun with --overwrite to replace it")


def apply_umask(path: Path) -> None:
    """Give ``path`` and everything under it the permissions a new file or folder gets under the
    user's umask (links are left alone)."""
    mask = umask()
    if path.is_dir() and not path.is_symlink():
        os.chmod(path, 0o777 & ~mask)
        for _, p, is_dir in _walk(path):
            if not p.is_symlink():
                os.chmod(p, (0o777 if is_dir else 0o666) & ~mask)
    elif not path.is_symlink():
        os.chmod(path, 0o666 & ~mask)


# ------------------------------------------------------------------------- the checks
def _check_target(target: Path, shown: str, who: str, overwrite: bool, flag: str, *, folder: bool,
                  replaceable: Callable[[Path], bool] | None = None) -> bool:
    """Whether ``target`` holds something now; refuse it unless this transaction may replace it."""
    if not os.path.lexists(target):
        return False
    if folder:
        if not target.is_dir():
            raise OutputError(f"{flag} {shown} exists and is not a folder; choose another {flag}")
        if not any(target.iterdir()):
            return True
        if not overwrite:
            raise FileExistsError(f"{flag} {shown} already exists and is not empty (pass overwrite to replace it)")
        check_replaceable(target, who, flag=flag, shown=shown)
        return True
    if target.is_dir():
        raise OutputError(f"{flag} {shown} is an existing folder, not a file; choose another {flag}")
    if not overwrite:
        raise FileExistsError(f"{flag} {shown} exists (pass overwrite to replace it)")
    if replaceable is not None and not replaceable(target):
        raise OutputError(f"{flag} {shown} is not an earlier output of {who}: --overwrite replaces only those; "
                          f"choose another {flag}")
    return True


def check_output(path: str | os.PathLike, *, who: str, inputs: Inputs | None = None, overwrite: bool = False,
                 flag: str = "--out", folder: bool = True, replaceable: Callable[[Path], bool] | None = None) -> Path:
    """Everything the transaction refuses, checked before any work (long jobs call it first); returns
    the resolved path the output will be written at. Writes nothing but a rollback of a killed swap."""
    target = resolve(path)
    check_apart(path, inputs, out_flag=flag)
    recover(target, flag=flag, shown=str(path))
    _check_target(target, str(path), who, overwrite, flag, folder=folder, replaceable=replaceable)
    check_writable(target)
    return target


def _write_failure(exc: BaseException, target: Path, stage: Path, shown: str, flag: str) -> OutputWriteError | None:
    """The one-line error for an exception that means the output could not be written, else None
    (an error about an input passes through as it is)."""
    if isinstance(exc, OSError) and not isinstance(exc, OutputError):
        if exc.filename is None:
            if exc.errno not in _WRITE_ERRNOS:
                return None
        else:
            p = resolve(exc.filename)
            staged = p.parent == target.parent and p.name.startswith(f".{target.name}.pave-")
            if not (staged or p.is_relative_to(stage) or p.is_relative_to(target)):
                return None
        code = exc.errno
    elif type(exc).__name__ == "SafetensorError" and (m := re.search(r"os error (\d+)", str(exc))):
        code = int(m[1])
    else:
        return None
    reason = os.strerror(code) if code else str(exc)
    return OutputWriteError(code, f"cannot write {flag} {shown}: {reason}; nothing was written there, what was "
                                  "there before is unchanged")


def _stage_paths(target: Path) -> tuple[Path, Path]:
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    pair = (target.with_name(f".{target.name}.pave-{token}.new"), target.with_name(f".{target.name}.pave-{token}.old"))
    with _LIVE_LOCK:
        _LIVE.update(pair)
    return pair


def _release(*paths: Path) -> None:
    for p in paths:
        _remove(p)
    with _LIVE_LOCK:
        _LIVE.difference_update(paths)


def _make_parent(target: Path, shown: str) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # NotADirectoryError, FileExistsError, PermissionError, read-only file system
        raise PermissionError(f"cannot write {shown}: its folder {target.parent} cannot be created ({exc})") from exc


@contextlib.contextmanager
def _staged(target: Path, stage: Path, old: Path, *, shown: str, flag: str) -> Iterator[None]:
    """Around a transaction's work: an error that means the output cannot be written becomes
    :class:`OutputWriteError`; the staging siblings are removed whatever happens."""
    try:
        yield
    except BaseException as exc:
        failure = _write_failure(exc, target, stage, shown, flag)
        if failure is not None:
            raise failure from exc
        raise
    finally:
        _release(stage, old)


# ------------------------------------------------------------------- the transactions
@contextlib.contextmanager
def output_folder(path: str | os.PathLike, *, who: str, inputs: Inputs | None = None, overwrite: bool = False,
                  flag: str = "--out") -> Iterator[Path]:
    """Yield an empty staging folder; when the body returns, seal it (umask, ownership record) and
    swap it in at ``path`` (see the module docstring). On any exception ``path`` is as it was."""
    shown = str(path)
    target = check_output(path, who=who, inputs=inputs, overwrite=overwrite, flag=flag)
    existed = os.path.lexists(target)
    _make_parent(target, shown)
    stage, old = _stage_paths(target)
    with _staged(target, stage, old, shown=shown, flag=flag):  # after an exchange the stage holds the old output
        stage.mkdir()
        yield stage
        _step("built")
        apply_umask(stage)
        _write_record(stage, who)
        _step("sealed")
        try:
            _check_target(target, shown, who, overwrite, flag, folder=True)
        except FileExistsError:
            if not existed:
                raise _appeared(shown) from None
            raise
        _swap_folder(stage, target, old, shown)
    _step("done")


@contextlib.contextmanager
def output_file(path: str | os.PathLike, *, who: str, inputs: Inputs | None = None, overwrite: bool = True,
                flag: str = "--out", replaceable: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a staging path (not created) beside ``path``; when the body has written it, give it the
    umask's permissions and rename it onto ``path`` atomically. On any exception ``path`` is as it
    was. ``replaceable`` (an existing file -> whether it is ours) guards ``overwrite``."""
    shown = str(path)
    target = check_output(path, who=who, inputs=inputs, overwrite=overwrite, flag=flag, folder=False,
                          replaceable=replaceable)
    _make_parent(target, shown)
    stage, old = _stage_paths(target)
    with _staged(target, stage, old, shown=shown, flag=flag):
        yield stage
        _step("built")
        if not stage.is_file():
            raise RuntimeError(f"{who}: nothing was written for {shown}")
        apply_umask(stage)
        _step("sealed")
        _publish_file(stage, target, overwrite, shown)
    _step("done")


def _write_record(folder: Path, who: str) -> None:
    rec = ownership_record(folder, who)
    path = folder / MANIFEST
    path.write_text(json.dumps(rec, indent=1), encoding="utf-8")
    os.chmod(path, 0o666 & ~umask())


class OwnedFolder:
    """A folder a long run fills file by file (each file its own transaction), with an ownership
    record kept up to date: a new folder, or an earlier one of the same writer that holds nothing
    else; a folder with anything else in it is refused up front."""

    def __init__(self, path: str | os.PathLike, *, who: str, inputs: Inputs | None = None, flag: str = "--out"):
        self.shown, self.who, self.flag = str(path), who, flag
        self.path = resolve(path)
        check_apart(path, inputs, out_flag=flag)
        if os.path.lexists(self.path):
            if not self.path.is_dir():
                raise OutputError(f"{flag} {path} exists and is not a folder; choose another {flag}")
            if any(self.path.iterdir()):
                check_replaceable(self.path, who, flag=flag, shown=self.shown)
        check_writable(self.path / MANIFEST)

    @contextlib.contextmanager
    def file(self, name: str) -> Iterator[Path]:
        """Write ``name`` (relative) through :func:`output_file`; the record then lists it."""
        with output_file(self.path / name, who=self.who, flag=self.flag) as tmp:
            yield tmp
        with _MANIFEST_LOCK:
            rec = read_record(self.path) or {"format": _FORMAT, "version": 1, "writer": self.who, "dirs": [], "files": {}}
            rec["files"][Path(name).as_posix()] = _file_entry(self.path / name)
            parts = Path(name).parts[:-1]
            rec["dirs"] = sorted(set(rec["dirs"]) | {Path(*parts[: i + 1]).as_posix() for i in range(len(parts))})
            with output_file(self.path / MANIFEST, who=self.who, flag=self.flag) as tmp:
                tmp.write_text(json.dumps(rec, indent=1), encoding="utf-8")

"""Safe outputs: written to a temporary sibling and renamed into place only when complete, with the
user's umask; an output that is, contains or lies inside an input is refused; ``overwrite``
replaces only an earlier output of the same command; an output that appeared while a run was
writing it (another run to the same path) is never replaced silently."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

_UMASK_LOCK = threading.Lock()


class OutputError(FileExistsError):
    """An output would replace or sit inside an input, or a file the command did not write."""


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


def check_apart(out: str | os.PathLike, inputs: Mapping[str, Iterable[str | os.PathLike | None]],
                *, out_flag: str = "--out") -> None:
    """Refuse an output that is, contains, or lies inside any input (symbolic links resolved).

    ``inputs`` maps a flag (``"--model"``) to the paths given with it; the error names the output
    flag, the input flag and the file.
    """
    target = Path(out).expanduser().resolve()
    for flag, paths in inputs.items():
        for p in paths:
            if p is None:
                continue
            src = Path(p).expanduser().resolve()
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


def check_replaceable(path: str | os.PathLike, owned: Callable[[Path], bool], who: str,
                      *, flag: str = "--out", marker: str | None = None) -> None:
    """An existing output folder may be replaced (``--overwrite``) only when it is an earlier output
    of ``who`` (it holds ``marker``) and every entry in it is something ``who`` writes
    (``owned(entry)``); else :class:`OutputError` naming the folder or the first other entry."""
    path = Path(path)
    if not path.is_dir() or not any(path.iterdir()):
        return
    if marker is not None and not (path / marker).is_file():
        raise OutputError(f"{flag} {path} is not an earlier output of {who} (it has no {marker}): --overwrite "
                          f"replaces only those; choose another {flag}")
    for entry in sorted(path.iterdir()):
        if not owned(entry):
            raise OutputError(f"{flag} {path} holds {entry.name}, which {who} does not write: --overwrite replaces "
                              f"only an earlier output of {who}; move {entry.name} away or choose another {flag}")


def _writable_parent(path: Path) -> None:
    """Create ``path``'s parent folder; an impossible or forbidden one is a ``PermissionError`` naming it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # NotADirectoryError, FileExistsError, PermissionError, read-only file system
        raise PermissionError(f"cannot write {path}: its folder {path.parent} cannot be created ({exc})") from exc
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: its folder {path.parent} is not writable")


def check_writable(path: str | os.PathLike) -> None:
    """Fail early (``PermissionError`` naming the path) when ``path`` could not be written later.

    Creates nothing: the nearest existing ancestor must be a writable directory. Long jobs call this
    before they start, so that an impossible output does not waste the work.
    """
    path = Path(path)
    anc = path.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise PermissionError(f"cannot write {path}: {anc} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: {anc} is not writable")


def _mk(maker, path: Path, **kwargs):
    try:
        return maker(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent, **kwargs)
    except OSError as exc:
        raise PermissionError(f"cannot write {path}: no temporary file can be created in {path.parent} ({exc})") from exc


def _appeared(path: Path) -> OutputError:
    return OutputError(f"{path} appeared while this run was writing it (another run writing the same output?): "
                       "it was left as it is and this run's result discarded; rerun with --overwrite to replace it")


def _publish_file(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic, and fails when another run created the path meanwhile
    except FileExistsError:
        raise _appeared(path) from None
    except OSError:  # no hard links on this file system
        if path.exists():
            raise _appeared(path) from None
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; on success rename it onto ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was. A process killed
    mid-write (SIGKILL) leaves ``path`` as it was and a hidden ``.<name>.*.tmp`` sibling behind.
    An unwritable destination raises ``PermissionError`` naming it, before anything is written.
    The file gets the permissions of a new file under the user's umask. With ``overwrite=False``
    a ``path`` that appeared meanwhile is not replaced (:class:`OutputError`).
    """
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"cannot write file {path}: it is an existing directory")
    _writable_parent(path)
    fd, tmp = _mk(tempfile.mkstemp, path)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~umask())
        yield tmp_path
        _publish_file(tmp_path, path, overwrite)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False, owned: Callable[[Path], bool] | None = None,
                     who: str = "this command", marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success move it to ``path``.

    Refuses an existing non-empty ``path`` unless ``overwrite``; with ``owned`` given, ``overwrite``
    also needs the old folder to hold ``marker`` and every entry of it to be ``owned`` (something
    ``who`` writes). The old
    directory is replaced only after the new one is complete; one that appeared during the run
    without ``overwrite`` is left as it is (:class:`OutputError`).
    """
    path = Path(path)
    _check_directory_target(path, overwrite, owned, who, marker)
    _writable_parent(path)
    tmp = Path(_mk(tempfile.mkdtemp, path))
    try:
        os.chmod(tmp, 0o777 & ~umask())
        yield tmp
        _check_directory_target(path, overwrite, owned, who, marker, during=True)
        if path.exists() and any(path.iterdir()):
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_directory_target(path: Path, overwrite: bool, owned, who: str, marker, *, during: bool = False) -> None:
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if not (path.exists() and any(path.iterdir())):
        return
    if not overwrite:
        if during:
            raise _appeared(path)
        raise FileExistsError(f"{path} already exists and is not empty (pass overwrite to replace it)")
    if owned is not None:
        check_replaceable(path, owned, who, marker=marker)

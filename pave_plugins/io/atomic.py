"""Atomic outputs: write to a temporary sibling, then rename, so readers never see half a file."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; on success rename it onto ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was. A process killed
    mid-write (SIGKILL) leaves ``path`` as it was and a hidden ``.<name>.*.tmp`` sibling behind.
    An unwritable destination raises ``PermissionError`` naming it, before anything is written.
    """
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"cannot write file {path}: it is an existing directory")
    _writable_parent(path)
    fd, tmp = _mk(tempfile.mkstemp, path)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success move it to ``path``.

    Refuses an existing non-empty ``path`` unless ``overwrite`` (then the old directory is
    replaced only after the new one is complete).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} already exists and is not empty (pass overwrite to replace it)")
    _writable_parent(path)
    tmp = Path(_mk(tempfile.mkdtemp, path))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

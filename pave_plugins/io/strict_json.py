"""Reports as strict JSON (RFC 8259): no ``NaN`` or ``Infinity``, which Python's ``json`` writes by
default and other readers refuse. A non-finite number (e.g. the relative change of a task vector
that is zero) is written as ``null``."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable


def _plain(obj: Any, default: Callable[[Any], Any]) -> Any:
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _plain(v, default) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, default) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # torch tensors, numpy arrays and scalars
        return _plain(obj.tolist(), default)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return _plain(default(obj), default)


def read_object(path: str | os.PathLike) -> dict:
    """A JSON file that must hold an object (a config): else a ``ValueError`` naming the file."""
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def dumps(obj: Any, *, indent: int | None = 1, default: Callable[[Any], Any] = str, **kwargs: Any) -> str:
    """``json.dumps`` that writes non-finite numbers as ``null`` and never emits ``NaN``/``Infinity``;
    objects JSON does not know go through ``default`` first (then the same rules)."""
    return json.dumps(_plain(obj, default), indent=indent, allow_nan=False, **kwargs)

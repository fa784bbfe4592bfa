"""Results that read the same on any computer: no absolute paths of the machine that ran them.

``results.json`` records the run's configuration and, per method, the recipes and files it used.
Before writing, every string that starts with one of the run's folders is rewritten: the model as
its package name and version when it lives in an installed package (else its folder name), the
cache, output and data folders, the temporary folder and the home folder as ``<cache>``, ``<out>``,
``<data>``, ``<tmp>`` and ``~``.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any


def model_label(model_path: str) -> str:
    """``name==version`` of the installed package holding ``model_path``, else the folder's name."""
    path = Path(model_path).resolve()
    roots = sorted({Path(p).resolve() for p in sys.path if p and Path(p).is_dir()}, key=lambda p: -len(p.parts))
    for root in roots:
        try:
            top = path.relative_to(root).parts[0]
        except (ValueError, IndexError):
            continue
        dists = importlib.metadata.packages_distributions().get(top)
        if dists and ("site-packages" in root.parts or "dist-packages" in root.parts):
            return f"{dists[0]}=={importlib.metadata.version(dists[0])}"
    return path.name


def _replacements(cfg: Any) -> list[tuple[str, str]]:
    pairs = [(getattr(cfg, "model_path", None), model_label(cfg.model_path) if getattr(cfg, "model_path", None) else ""),
             (getattr(cfg, "cache_dir", None), "<cache>"), (getattr(cfg, "out_dir", None), "<out>"),
             (getattr(cfg, "data_dir", None), "<data>"), (tempfile.gettempdir(), "<tmp>"),
             (os.path.expanduser("~"), "~")]
    out = []
    for path, label in pairs:
        if not path:
            continue
        for variant in {str(path), str(Path(path).resolve())}:
            if os.path.isabs(variant) and variant != os.sep:
                out.append((variant.rstrip(os.sep), label))
    return sorted(out, key=lambda p: -len(p[0]))  # the most specific folder first


def portable(obj: Any, cfg: Any) -> Any:
    """``obj`` (JSON-like) with every absolute path under the run's folders replaced by a label."""
    reps = [(re.compile(re.escape(prefix) + r"(?=/|\\|$|[\s'\",:}\]])"), label) for prefix, label in _replacements(cfg)]

    def fix(x: Any) -> Any:
        if isinstance(x, str):
            for pattern, label in reps:
                x = pattern.sub(label.replace("\\", "\\\\"), x)
            return x
        if isinstance(x, dict):
            return {fix(k): fix(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [fix(v) for v in x]
        return x

    return fix(obj)

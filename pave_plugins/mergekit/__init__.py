"""mergekit adapters: the ``pave`` and ``tsv`` merge methods.

They are registered in mergekit's registry through the ``mergekit.merge_methods`` entry points
(see :mod:`pave_plugins._mergekit_bootstrap`), so the stock ``mergekit-yaml`` accepts
``merge_method: pave`` and ``merge_method: tsv`` after ``pip install``. Attributes are loaded
lazily: importing :mod:`pave_plugins.mergekit.purification` (used by ``pave purify``) does not
import mergekit.
"""

from __future__ import annotations

from typing import Any

__all__ = ["pave_merge_method", "tsv_merge_method", "last_report", "PAVE_URL", "TSV_URL"]


def __getattr__(name: str) -> Any:
    if name in ("pave_merge_method", "PAVE_URL"):
        from pave_plugins._mergekit_bootstrap import when_imported

        from . import pave, report

        # attach the rank report to mergekit's output writer when (and only if) it is imported:
        # mergekit.io.tasks pulls in transformers, too heavy for `import mergekit.merge_methods`
        when_imported("mergekit.io.tasks", report.install_output_hooks)
        return getattr(pave, name)
    if name in ("tsv_merge_method", "TSV_URL"):
        from . import tsv

        return getattr(tsv, name)
    if name == "last_report":
        from .report import last_report

        return last_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

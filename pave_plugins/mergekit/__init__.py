"""mergekit adapters: the ``pave``, ``tsv`` and ``regmean`` merge methods.

They are registered in mergekit's registry through the ``mergekit.merge_methods`` entry points
(see :mod:`pave_plugins._mergekit_bootstrap`), so the stock ``mergekit-yaml`` accepts
``merge_method: pave``, ``merge_method: tsv`` and ``merge_method: regmean`` after ``pip install``. Attributes are loaded
lazily; the PAVE step itself lives in :mod:`pave_plugins.engine` (``pave purify`` uses it without
mergekit).
"""

from __future__ import annotations

import sys
from typing import Any

from pave_plugins.hosts import require_host

require_host("mergekit", "pave_plugins.mergekit")

__all__ = [
    "pave_merge_method", "tsv_merge_method", "regmean_merge_method", "last_report", "PAVE_URL", "TSV_URL",
    "REGMEAN_URL",
]


def _being_imported(module: str, attribute: str) -> bool:
    """True while ``module`` is half-way through its own import (it imported mergekit, which then
    loaded the plugins): the entry point then yields nothing and the module registers itself at its
    end (see ``register_late`` in the bootstrap)."""
    mod = sys.modules.get(f"{__name__}.{module}")
    return mod is not None and not hasattr(mod, attribute)


def __getattr__(name: str) -> Any:
    if name in ("pave_merge_method", "PAVE_URL"):
        if name == "pave_merge_method" and _being_imported("pave", name):
            from pave_plugins._mergekit_bootstrap import defer

            defer("pave")
            return ()
        from . import pave

        return getattr(pave, name)
    if name in ("tsv_merge_method", "TSV_URL"):
        if name == "tsv_merge_method" and _being_imported("tsv", name):
            from pave_plugins._mergekit_bootstrap import defer

            defer("tsv")
            return ()
        from . import tsv

        return getattr(tsv, name)
    if name in ("regmean_merge_method", "REGMEAN_URL"):
        if name == "regmean_merge_method" and _being_imported("regmean", name):
            from pave_plugins._mergekit_bootstrap import defer

            defer("regmean")
            return ()
        from . import regmean

        return getattr(regmean, name)
    if name == "last_report":
        from .report import last_report

        return last_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

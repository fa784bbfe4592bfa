"""Which host tools are installed: mergekit and FusionBench are optional extras.

The core and ``pave collect / purify / rethink`` need neither. ``pip install 'pave-plugins[mergekit]'``
adds mergekit, ``[fusion-bench]`` FusionBench, ``[all]`` both. Whatever needs a missing host says so
with :class:`HostMissingError`, naming the extra to install.
"""

from __future__ import annotations

import importlib.util
import sys

# import name -> (what the user knows it as, the extra that installs it)
HOSTS = {"mergekit": ("mergekit", "mergekit"), "fusion_bench": ("FusionBench", "fusion-bench")}


class HostMissingError(ImportError):
    """A host tool (mergekit or FusionBench) that this feature needs is not installed."""


def host_available(module: str) -> bool:
    """True when the host's package can be imported (without importing it)."""
    if module in sys.modules:  # imported already (some hosts' lazy modules have no __spec__), or blocked (None)
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_host(module: str, feature: str) -> None:
    """Raise :class:`HostMissingError` naming the extra to install when ``module`` is missing."""
    if not host_available(module):
        name, extra = HOSTS[module]
        raise HostMissingError(
            f"{feature} needs {name}, which is not installed: pip install 'pave-plugins[{extra}]' "
            "(or 'pave-plugins[all]' for both hosts; from a checkout: pip install -e '.[" + extra + "]')"
        )

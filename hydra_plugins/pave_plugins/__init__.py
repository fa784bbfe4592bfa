"""Hydra search-path plugin: makes ``method=pave/...`` and ``modelpool=pave/...`` configs of
pave_plugins visible to the stock ``fusion_bench`` CLI (appended after FusionBench's own configs).

Kept tiny on purpose: Hydra imports this module on every run.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class PavePluginsSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="pave_plugins", path="pkg://pave_plugins.configs")

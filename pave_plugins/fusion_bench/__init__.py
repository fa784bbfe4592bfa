"""FusionBench (0.2.33) algorithms of pave_plugins.

Found by the stock ``fusion_bench`` CLI through the Hydra search-path plugin
``hydra_plugins.pave_plugins`` (configs under ``method/pave/`` and ``modelpool/pave/``):

* ``pave/pave`` (:class:`PAVEAlgorithm`): PAVE purification (arXiv 2510.14697) with spectral rank
  allocation, wrapping any FusionBench task-vector method, optional progressive full-rank search;
  ``pave/pave_ta``, ``pave/pave_ties``, ``pave/pave_emr``, ``pave/pave_tsv_m``, ... presets.
* ``pave/regmean`` (:class:`RegMeanAlgorithm`): RegMean (arXiv 2212.09849) on the covariance files of
  ``pave collect``; ``pave/pave_regmean``: PAVE, then RegMean.
* ``pave/tsv_m`` (:class:`TSVMerging`) and ``pave/tsv_c`` (:class:`TSVCompression`): TSV-M / TSV-C
  (arXiv 2412.00081), same weights as FusionBench's TSVM, streamed.
"""

from pave_plugins.hosts import require_host

require_host("fusion_bench", "pave_plugins.fusion_bench")

from .boundary import install_log_filter  # noqa: E402
from .pave import PAVEAlgorithm, PAVEConfigError  # noqa: E402
from .regmean import RegMeanAlgorithm, RegMeanConfigError  # noqa: E402
from .tsv import TSVCompression, TSVMerging  # noqa: E402

install_log_filter()

__all__ = ["PAVEAlgorithm", "PAVEConfigError", "RegMeanAlgorithm", "RegMeanConfigError", "TSVCompression", "TSVMerging"]

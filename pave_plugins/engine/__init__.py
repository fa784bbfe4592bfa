"""The host-neutral PAVE engine: settings, the per-layer step and the rank report.

Every face (mergekit ``pave``, FusionBench ``pave/pave``, ``pave purify``, the benchmark) builds one
:class:`PaveSettings` and one covariance source per model, runs the fit check
(:func:`pave_plugins.collect.check_covariance_file`), and calls :meth:`PaveEngine.step` per layer.
"""

from .report import REPORT_NAME, RankReport
from .settings import COMPUTE_DTYPES, DEFAULT_RHO, PaveSettings
from .step import LayerStep, ModelRecord, PaveEngine, purified_weight, purified_weight_from_tail

__all__ = [
    "COMPUTE_DTYPES",
    "DEFAULT_RHO",
    "LayerStep",
    "ModelRecord",
    "PaveEngine",
    "PaveSettings",
    "REPORT_NAME",
    "RankReport",
    "purified_weight",
    "purified_weight_from_tail",
]

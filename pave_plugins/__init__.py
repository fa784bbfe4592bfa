"""pave_plugins: PAVE, spectral rank allocation, TSV-M and LoRA-DV for mergekit and FusionBench.

The maths lives in :mod:`pave_plugins.core` (pure torch); the host adapters in
``pave_plugins.mergekit`` and ``pave_plugins.fusion_bench`` are thin wrappers around it.
"""

__version__ = "0.1.0"

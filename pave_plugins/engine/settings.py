"""The settings of a PAVE run: written once, validated once, where a face builds them.

mergekit parameters, FusionBench config keys and ``pave purify`` flags all map onto
:class:`PaveSettings`; the engine (:mod:`pave_plugins.engine.step`) trusts it.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, fields
from typing import Any

import torch

from pave_plugins.core.purify import TARGETS
from pave_plugins.core.rank_allocation import ALLOCATIONS, check_rho_gamma
from pave_plugins.io.sources import FINGERPRINT_POLICIES

#: preserved rank ratio of Algorithm 1 (one of the paper's values)
DEFAULT_RHO = 0.9375
#: compute dtypes of the maths (float64 is the default: float32 is not usable for eq. 6 on
#: ill-conditioned covariances, see README)
COMPUTE_DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32}
_DTYPE_ALIASES = {"double": "float64", "fp64": "float64", "float": "float32", "fp32": "float32"}

logger = logging.getLogger("pave_plugins")


@functools.lru_cache(maxsize=1)
def warn_float32_weight_target() -> None:
    """Once per process: eq. 6 in float32 is inaccurate on real covariances (measured)."""
    logger.warning(
        "pave: compute_dtype float32 with target 'weight' (eq. 6) is inaccurate on ill-conditioned "
        "covariances: eq. 6 truncates the whole fine-tuned weight, so float32's error in the discarded "
        "subspace scales with ||W||, not ||dW||; measured on LLaMA-7B layer shapes with cond(C) ~ 1e6, the "
        "purified task vector is 43-98% off its float64 value (1% with target 'delta'). Use float64 (the "
        "default) or target 'delta'."
    )


def compute_dtype_name(value: str | torch.dtype) -> str:
    """``"float64"``/``"float32"`` (aliases ``double``, ``fp64``, ``float``, ``fp32``, or a torch dtype)."""
    key = str(value).lower().replace("torch.", "")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be 'float64' or 'float32', got {value!r}")
    return key


@dataclass(frozen=True)
class PaveSettings:
    """PAVE's parameters (PAVE paper, Sec. 3.3 and Algorithm 1).

    ``rho``: preserved rank ratio in (0, 1]; ``gamma``: stopping ratio (``None``: ``rho - (1-rho)/2``);
    ``rank_allocation``: ``spectral`` (Algorithm 1) or ``uniform`` (Table 4 baseline); ``target``:
    ``weight`` (eq. 6) or ``delta`` (CO-SVD of the task vector); ``compute_dtype``: of the maths;
    ``allow_missing_covariance``: a layer some models have a covariance for and others lack keeps the
    plain task vector of the latter (default: error); ``on_fingerprint_mismatch``: a covariance
    collected on other weights of the same shapes is an ``error``, a ``warn``-ing or ``ignore``-d.
    """

    rho: float = DEFAULT_RHO
    gamma: float | None = None
    rank_allocation: str = "spectral"
    target: str = "weight"
    compute_dtype: str = "float64"
    allow_missing_covariance: bool = False
    on_fingerprint_mismatch: str = "error"

    def __post_init__(self) -> None:
        check_rho_gamma(self.rho, self.gamma)
        if self.rank_allocation not in ALLOCATIONS:
            raise ValueError(f"rank_allocation must be one of {ALLOCATIONS}, got {self.rank_allocation!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        object.__setattr__(self, "compute_dtype", compute_dtype_name(self.compute_dtype))
        if self.compute_dtype == "float32" and self.target == "weight":
            warn_float32_weight_target()
        if self.on_fingerprint_mismatch not in FINGERPRINT_POLICIES:
            raise ValueError(
                f"on_fingerprint_mismatch must be one of {FINGERPRINT_POLICIES}, got {self.on_fingerprint_mismatch!r}"
            )

    @property
    def resolved_gamma(self) -> float:
        """``gamma``, or the paper's default ``rho - (1 - rho) / 2``."""
        return check_rho_gamma(self.rho, self.gamma)

    @property
    def dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.compute_dtype]

    def to_dict(self) -> dict[str, Any]:
        """Every setting by name (reports, cards)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

"""The settings of a PAVE run: written once, validated once, where a face builds them.

mergekit parameters, FusionBench config keys and ``pave purify`` flags all map onto
:class:`PaveSettings`; the engine (:mod:`pave_plugins.engine.step`) trusts it.
"""

from __future__ import annotations

from dataclasses import dataclass

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

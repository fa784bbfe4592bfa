"""The settings of a PAVE run: written once, validated once, where a face builds them.

mergekit parameters, FusionBench config keys and ``pave purify`` flags all map onto
:class:`PaveSettings`; the engine (:mod:`pave_plugins.engine.step`) trusts it.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from pave_plugins.core.purify import DAMPING_RULES, TARGETS, Damping
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


def setting(default: Any, help: str, *, choices: Sequence[str] | None = None, check: Callable[[Any], Any] | None = None,
            optional: bool = False, face_defaults: Mapping[str, Any] | None = None,
            face_names: Mapping[str, str] | None = None) -> Any:
    """One row of a settings table: a dataclass field whose metadata is what every face derives its
    declaration from (mergekit ``ParameterSpec``, argparse flag, FusionBench config key, see
    :func:`table`). ``check``: the value's own rule (raises ``ValueError``); ``optional``: ``None``
    allowed; ``face_defaults`` / ``face_names``: a face whose default / name differs (``mergekit``,
    ``fusion_bench``), e.g. mergekit's own ``lambda`` for a scaling factor."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "check": check, "optional": optional,
            "face_defaults": dict(face_defaults or {}), "face_names": dict(face_names or {})}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Setting:
    """A row of a settings table, as the faces read it."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None
    check: Callable[[Any], Any] | None
    optional: bool
    face_defaults: dict[str, Any]
    face_names: dict[str, str]

    def default_for(self, face: str) -> Any:
        return self.face_defaults.get(face, self.default)

    def name_for(self, face: str) -> str:
        return self.face_names.get(face, self.name)


_TYPES = {"float": float, "float | None": float, "str": str, "bool": bool, "int": int, "int | None": int,
          "tuple[str, ...]": tuple}
#: Algorithm 1's ranks per layer (the paper's text) or each model's overall ratio on all its layers (authors' code)
RANK_GRANULARITIES: tuple[str, ...] = ("layer", "model")


@functools.lru_cache(maxsize=None)
def table(cls: type) -> tuple[Setting, ...]:
    """The settings table of a settings dataclass (its fields declared with :func:`setting`)."""
    return tuple(
        Setting(f.name, _TYPES[str(f.type)], f.default, f.metadata["help"], f.metadata["choices"],
                f.metadata["check"], f.metadata["optional"], f.metadata["face_defaults"], f.metadata["face_names"])
        for f in fields(cls) if "help" in f.metadata
    )


def settings_for(cls: type, value_of: Callable[[str], Any], face: str) -> Any:
    """``cls`` built from a face's values, each read by its name in that face (``value_of(name)``:
    mergekit's parameters, a FusionBench algorithm's attributes)."""
    return cls(**{row.name: value_of(row.name_for(face)) for row in table(cls)})


def check_table(obj: Any) -> None:
    """Every setting of ``obj`` against its row: type (``true`` is not a number), choices, own rule."""
    for row in table(type(obj)):
        value = getattr(obj, row.name)
        if value is None and row.optional:
            continue
        if row.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{row.name} must be a number, got {value!r}")
        elif row.type is bool and not isinstance(value, bool):
            raise ValueError(f"{row.name} must be true or false, got {value!r}")
        elif row.type is tuple and not (isinstance(value, tuple) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{row.name} must be a list of model names, got {value!r}")
        if row.choices is not None and value not in row.choices:
            raise ValueError(f"{row.name} must be one of {row.choices}, got {value!r}")
        if row.check is not None:
            row.check(value)


def _check_rho(rho: float) -> None:
    check_rho_gamma(rho, None)


def _check_gamma(gamma: float) -> None:
    check_rho_gamma(1.0, gamma)  # on its own; against rho in PaveSettings


def _check_damping(damping: float) -> None:
    if not (math.isfinite(damping) and damping >= 0.0):
        raise ValueError(f"damping must be a finite number >= 0, got {damping}")


@dataclass(frozen=True)
class PaveSettings:
    """PAVE's parameters (PAVE paper, Sec. 3.3 and Algorithm 1): the one declaration of each, from
    which the mergekit parameters, the ``pave purify`` flags and the FusionBench config are derived
    (:func:`table`). Validated once, when built."""

    rho: float = setting(DEFAULT_RHO, "preserved rank ratio of Algorithm 1, in (0, 1]; paper values 7/8, 15/16, "
                         "31/32, 63/64; 1 reproduces the inner method", check=_check_rho)
    gamma: float | None = setting(None, "stopping ratio of Algorithm 1, in [0, rho] (default rho - (1 - rho) / 2)",
                                  check=_check_gamma, optional=True)
    rank_allocation: str = setting("spectral", "spectral: Algorithm 1; uniform: every model keeps floor(rho R) "
                                   "(the Table 4 baseline)", choices=ALLOCATIONS)
    target: str = setting("weight", "weight: eq. 6 as published (SVD of W_ft C); delta: SVD of dW C (base weight "
                          "untouched)", choices=TARGETS)
    damping: float = setting(
        0.0, "diagonal damping added to every covariance before eq. 5 (damping_rule relative: x mean(diag C); "
        "authors: the starting eps on C / N); 0 with relative: only a singular covariance is damped",
        check=_check_damping)
    damping_rule: str = setting(
        "relative", "relative: C + damping mean(diag C) I; authors: C / N + eps I with eps doubled from damping "
        "until ||C_d^-1 C_d - I|| < 1e-2 (the PAVE authors' code; N: the file's token count)", choices=DAMPING_RULES)
    rank_granularity: str = setting(
        "layer", "layer: Algorithm 1's ranks per layer (the paper's text); model: each model's overall ratio "
        "sum_l r_i^l / sum_l R^l applied to all its layers (the authors' code)", choices=RANK_GRANULARITIES)
    full_rank_models: tuple[str, ...] = setting(
        (), "models kept unpurified (their plain task vector enters the inner method; Appendix A.1's search "
        "in the fixed form of the authors' code), by name or folder name",
        face_names={"mergekit": "full_rank"})  # mergekit: a per-model parameter, as its own weight
    compute_dtype: str = setting("float64", "dtype of the maths (float32 is inaccurate for target weight on "
                                 "ill-conditioned covariances)", choices=tuple(COMPUTE_DTYPES))
    allow_missing_covariance: bool = setting(False, "a layer some models have a covariance for and others lack "
                                             "keeps the plain task vector of the latter (default: error)")
    on_fingerprint_mismatch: str = setting(
        "error", "a covariance collected on other weights of the same shapes: error, warn or ignore",
        choices=FINGERPRINT_POLICIES,
        # mergekit and FusionBench may hand a LoRA-merged or re-saved copy of the model
        face_defaults={"mergekit": "warn", "fusion_bench": "warn"},
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "compute_dtype", compute_dtype_name(self.compute_dtype))
        names = self.full_rank_models
        if isinstance(names, str):  # one name
            object.__setattr__(self, "full_rank_models", (names,))
        elif isinstance(names, Sequence) and not isinstance(names, tuple):  # YAML, Hydra, argparse lists
            object.__setattr__(self, "full_rank_models", tuple(names))
        check_table(self)
        if self.damping_rule == "authors" and self.damping == 0.0:
            raise ValueError("damping_rule authors needs damping > 0 (the authors' code starts at 0.1 for GLUE/ViT)")
        object.__setattr__(self, "_gamma", check_rho_gamma(self.rho, self.gamma))
        if self.compute_dtype == "float32" and self.target == "weight":
            warn_float32_weight_target()

    @property
    def resolved_gamma(self) -> float:
        """``gamma``, or the paper's default ``rho - (1 - rho) / 2`` (checked against rho once, when built)."""
        return self._gamma  # type: ignore[attr-defined]

    @property
    def damping_spec(self) -> Damping:
        return Damping(self.damping, self.damping_rule)

    @property
    def dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.compute_dtype]

    def to_dict(self) -> dict[str, Any]:
        """Every setting by name (reports, cards)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _core_rule(name: str) -> Callable[[Any], Any]:
    """The rule of LoRA-DV's core record for one value (:class:`~pave_plugins.core.rethink.RethinkConfig`
    validates it; the rule is written there once)."""
    from pave_plugins.core.rethink import RethinkConfig

    def check(value: Any) -> None:
        RethinkConfig(**{name: value})

    return check


def _rethink_default(name: str) -> Any:
    from pave_plugins.core.rethink import RethinkConfig

    value = getattr(RethinkConfig(), name)
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value


@dataclass(frozen=True)
class RethinkSettings:
    """LoRA-DV's parameters (LoRA-DV paper, Sec. 3; Table 4's ablations) as the faces declare them:
    the ``pave rethink`` flags and the FusionBench ``pave/rethink`` keys are derived from this table
    (:func:`table`); defaults and rules are those of the core record
    :class:`~pave_plugins.core.rethink.RethinkConfig`, which :meth:`config` builds."""

    loss: str = setting(_rethink_default("loss"), "ce: labels / target tokens; entropy: eq. 14, no labels",
                        choices=("ce", "entropy"))
    iterations: int = setting(_rethink_default("iterations"), "T rethinking iterations (paper: 3)",
                              check=_core_rule("iterations"))
    epochs: int = setting(_rethink_default("epochs"), "epochs per iteration (0: write the input merge back "
                          "unchanged; with top_k and no keep_tail, its top-K truncation)", check=_core_rule("epochs"))
    lr: float = setting(_rethink_default("lr"), "Adam learning rate (paper: 5e-3; LLMs 1e-4)", check=_core_rule("lr"))
    mode: str = setting(_rethink_default("mode"), "anisotropic: Lambda per singular value (paper); scalar: one scale "
                        "per layer; random: random Lambda (Table 4 ablations)",
                        choices=("anisotropic", "scalar", "random"))
    top_k: int | None = setting(_rethink_default("top_k"), "dense path: keep only the top-k components of each delta",
                                check=_core_rule("top_k"), optional=True)
    keep_tail: bool = setting(_rethink_default("keep_tail"), "with top_k: keep the discarded tail frozen instead of "
                              "dropping it")
    redecompose: str = setting(_rethink_default("redecompose"), "iterations >= 2: exact closed-form SVD of the "
                               "factored delta, or a dense SVD of the stored weights", choices=("factored", "dense"))
    compute_dtype: str = setting(_rethink_default("compute_dtype"), "dtype of the SVDs and of Lambda's training",
                                 choices=("float32", "float64"))
    samples: int | None = setting(_rethink_default("samples"), "calibration samples per task (a seeded random "
                                  "subset; all: 0 in pave rethink, null in FusionBench)", check=_core_rule("samples"), optional=True,
                                  face_names={"fusion_bench": "n_samples"})
    batch_size: int = setting(_rethink_default("batch_size"), "calibration examples per batch (a batch holds one "
                              "task's)", check=_core_rule("batch_size"))
    seed: int = setting(_rethink_default("seed"), "calibration subset, batch order and random Lambda",
                        check=_core_rule("seed"))

    def __post_init__(self) -> None:
        check_table(self)

    def config(self, **extra: Any) -> Any:
        """The core record (``extra``: what is not a setting of a face, e.g. ``progress``)."""
        from pave_plugins.core.rethink import RethinkConfig

        return RethinkConfig(**{f.name: getattr(self, f.name) for f in fields(self)}, **extra)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

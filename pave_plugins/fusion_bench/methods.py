"""FusionBench method configs: found by name (FusionBench's own, then this package's), turned into
an inner method of ``pave/pave``, instantiated and run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

def method_config_roots() -> list[Path]:
    """Folders searched for ``method/<name>.yaml``: FusionBench's own configs, then ours."""
    roots: list[Path] = []
    try:
        from fusion_bench.constants.paths import DEFAULT_CONFIG_PATH

        if DEFAULT_CONFIG_PATH is not None:
            roots.append(Path(DEFAULT_CONFIG_PATH))
    except Exception:  # pragma: no cover - fusion_bench layout changed
        pass
    roots.append(Path(__file__).resolve().parent.parent / "configs")
    return roots


def load_method_config(name: str) -> DictConfig:
    """Config of a FusionBench method by its config name (``task_arithmetic``,
    ``ties_merging``, ``emr_merging/emr_merging``, ``dare/task_arithmetic``, ``pave/tsv_m``, ...),
    as ``fusion_bench method=<name>`` would resolve it (FusionBench's folder first, then ours).
    """
    name = str(name).strip().removeprefix("method/").removesuffix(".yaml")
    if not name:
        raise ValueError("inner method name is empty")
    searched = []
    for root in method_config_roots():
        path = root / "method" / f"{name}.yaml"
        searched.append(str(path))
        if path.is_file():
            cfg = OmegaConf.load(path)
            if not isinstance(cfg, DictConfig) or "_target_" not in cfg:
                raise ValueError(f"method config {path} has no _target_; it cannot be used as PAVE's inner method")
            if "defaults" in cfg:
                defaults = [d for d in cfg.defaults if d != "_self_"]
                if defaults:
                    raise ValueError(
                        f"method config {path} uses a Hydra defaults list ({defaults}); give PAVE's inner "
                        "method as a dict with _target_ instead"
                    )
                cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "defaults"])
            return cfg
    available = sorted(
        {
            str(p.relative_to(root / "method")).removesuffix(".yaml")
            for root in method_config_roots()
            if (root / "method").is_dir()
            for p in (root / "method").rglob("*.yaml")
        }
    )
    close = [a for a in available if name.split("/")[-1] in a][:10]
    raise ValueError(
        f"unknown inner method {name!r}: no method config of that name (searched {searched}). "
        + (f"Did you mean one of {close}? " if close else "")
        + "Give a FusionBench method config name (e.g. task_arithmetic, ties_merging, "
        "emr_merging/emr_merging, dare/task_arithmetic, pave/tsv_m) or a dict with _target_."
    )


def inner_method_config(inner: Any) -> DictConfig:
    """Normalise PAVE's ``inner`` parameter to a method config with ``_target_``.

    Accepts a config name (str), a dict with ``_target_``, or a dict with ``name`` (a config name)
    plus overrides of its parameters.
    """
    if inner is None:
        raise ValueError("PAVE needs an inner merging method (inner: task_arithmetic, ties_merging, ...)")
    if isinstance(inner, str):
        return load_method_config(inner)
    if isinstance(inner, (dict, DictConfig)):
        cfg = OmegaConf.create(OmegaConf.to_container(inner, resolve=True) if isinstance(inner, DictConfig) else inner)
        if "_target_" in cfg:
            return cfg
        if "name" in cfg:
            base = load_method_config(cfg.name)
            overrides = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "name"])
            return OmegaConf.merge(base, overrides)
        raise ValueError(
            f"inner method dict needs a _target_ (a FusionBench algorithm class) or a 'name' "
            f"(a method config name); got keys {list(cfg.keys())}"
        )
    raise ValueError(f"inner must be a method config name or a dict with _target_, got {type(inner).__name__}")


def instantiate_algorithm(cfg: DictConfig, *, fabric=None, program=None):
    """Instantiate a FusionBench algorithm the way the program does (``_recursive_`` false)."""
    from fusion_bench import BaseAlgorithm, import_object, instantiate

    try:
        import_object(cfg._target_)
    except Exception as exc:
        raise ValueError(f"unknown inner method: cannot import _target_ {cfg._target_!r} ({exc})") from exc
    algo = instantiate(cfg, _recursive_=cfg.get("_recursive_", False))
    if not isinstance(algo, BaseAlgorithm) and not hasattr(algo, "run"):
        raise ValueError(f"inner method {cfg._target_!r} is not a FusionBench algorithm (no run(modelpool))")
    if program is not None and hasattr(algo, "_program"):
        algo._program = program
    if fabric is not None and hasattr(algo, "_fabric_instance"):
        algo._fabric_instance = fabric
    return algo


def run_inner_method(cfg: DictConfig, pool: Any, *, fabric=None, covariance_sources: Any = None) -> Any:
    """Instantiate and run a FusionBench method on ``pool`` (with its start/end hooks).

    ``covariance_sources``: handed to an inner method that takes them and has none of its own
    (``pave/regmean`` inside ``pave/pave`` reads PAVE's covariances)."""
    inner = instantiate_algorithm(cfg, fabric=fabric, program=None)
    if getattr(inner, "covariance_sources", False) is None and getattr(inner, "covariances", None) is None:
        inner.covariance_sources = covariance_sources
    if hasattr(inner, "on_run_start"):
        inner.on_run_start()
    result = inner.run(pool)
    if hasattr(inner, "on_run_end"):
        inner.on_run_end()
    return result



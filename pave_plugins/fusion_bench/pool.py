"""The model pool of a FusionBench run: checked, its local inputs listed, its splits, its calibration
collate, and the covariance files named for its models."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

def checked_pool(modelpool: Any, who: str, error: type[Exception] = ValueError, *, need_models: bool = True):
    """The pool as a ``BaseModelPool`` (a plain ``{name: module}`` dict is wrapped), with a
    ``_pretrained_`` model and, if ``need_models``, at least one fine-tuned model; else ``error``."""
    from fusion_bench import BaseModelPool

    if not isinstance(modelpool, BaseModelPool):
        modelpool = BaseModelPool(modelpool)
    if need_models and not list(modelpool.model_names):
        raise error(f"{who}: the model pool has no fine-tuned models")
    if not modelpool.has_pretrained:
        raise error(f"{who}: the model pool needs a `_pretrained_` model (the base of the task vectors)")
    return modelpool


def _local_path(cfg: Any) -> str | None:
    """The local folder or file a pool entry loads from (None for a module or a hub id)."""
    if isinstance(cfg, (DictConfig, Mapping)):
        cfg = next((cfg.get(k) for k in ("pretrained_model_name_or_path", "path", "model_path") if cfg.get(k)), None)
    if isinstance(cfg, (str, os.PathLike)) and os.path.exists(os.path.expanduser(os.fspath(cfg))):
        return os.fspath(cfg)
    return None


def pool_inputs(modelpool: Any, **extra: Any) -> dict[str, list]:
    """Every local path a run reads: the pool's models and tokenizer, and ``extra`` (flag -> a path,
    a list or a mapping of paths, e.g. the covariance files), for the output checks."""
    models = getattr(modelpool, "_models", None) or {}
    paths = [_local_path(models[n]) for n in models]
    config = getattr(modelpool, "config", None)
    tokenizer = config.get("tokenizer") if isinstance(config, (DictConfig, Mapping)) else None
    inputs: dict[str, list] = {"modelpool.models": [p for p in paths if p], "modelpool.tokenizer": [_local_path(tokenizer)]}
    for flag, value in extra.items():
        if isinstance(value, (DictConfig, Mapping)):
            value = [_local_path(v) or (str(v) if isinstance(v, (str, os.PathLike)) else None) for v in value.values()]
        elif isinstance(value, (str, os.PathLike)) or value is None:
            value = [value]
        inputs[flag] = list(value)
    return inputs


def covariance_paths(covs: Any, names, who: str, error: type[Exception]) -> dict[str, Any]:
    """``{model name: covariance file or source}`` from a mapping or a folder of ``<name>.safetensors``."""
    if isinstance(covs, (str, os.PathLike)):
        folder = Path(covs)
        if not folder.is_dir():
            raise error(
                f"{who}: covariances={str(covs)!r} is not a folder; give a mapping {{model name: file}} "
                "or a folder holding <model name>.safetensors"
            )
        return {n: folder / f"{n}.safetensors" for n in names}
    mapping = dict(OmegaConf.to_container(covs, resolve=True) if isinstance(covs, DictConfig) else covs)
    missing = [n for n in names if n not in mapping]
    if missing:
        raise error(
            f"{who}: missing covariance for model(s) {missing}: method.covariances names "
            f"{sorted(mapping)}; add '<model name>: <file from pave collect>' for each model of the pool"
        )
    extra = sorted(str(k) for k in mapping if k not in names)
    if extra:
        raise error(
            f"{who}: method.covariances names {extra}, which the model pool does not have (its models: "
            f"{list(names)}): a misspelt name would leave that model without its covariance; remove or rename it"
        )
    return {n: mapping[n] for n in names}


def covariance_source(name: str, path: Any, who: str, error: type[Exception]):
    """A covariance source for model ``name``: an existing source, or a file of ``pave collect``."""
    from pave_plugins.io.covariance import CovarianceFile
    from pave_plugins.io.sources import CovarianceSource

    if isinstance(path, CovarianceSource):
        return path
    if isinstance(path, (str, os.PathLike)):
        if not Path(path).is_file():
            raise error(f"{who}: missing covariance for model {name!r}: file not found: {path}")
        return CovarianceFile(path)
    raise error(f"{who}: covariance for model {name!r} must be a file path, got {path!r}")


POOL_SPLITS = ("train", "val", "test")


def pool_split(modelpool: Any, split: str) -> tuple[list[str], Any]:
    """``(dataset names, loader)`` of one split (``train``/``val``/``test``) of a model pool."""
    has = getattr(modelpool, f"has_{split}_dataset")
    names = list(getattr(modelpool, f"{split}_dataset_names")) if has else []
    return names, getattr(modelpool, f"load_{split}_dataset")


def padding_collate(modelpool: Any):
    """Calibration batches of a pool with a tokenizer: ``DataCollatorWithPadding`` after the one
    pad-token rule (:func:`pave_plugins.collect.data.ensure_pad_token`); ``None`` (the default
    collate) when the pool has no tokenizer."""
    tokenizer = None
    if hasattr(modelpool, "load_tokenizer"):
        try:
            tokenizer = modelpool.load_tokenizer()
        except Exception:  # a pool without a usable tokenizer: its datasets collate themselves
            tokenizer = None
    if tokenizer is None:
        return None
    from transformers import DataCollatorWithPadding

    from pave_plugins.collect.data import ensure_pad_token

    return DataCollatorWithPadding(ensure_pad_token(tokenizer))



"""Glue shared by the FusionBench algorithms of pave_plugins: config look-up, dtypes, reports,
model cards. No maths here (that lives in :mod:`pave_plugins.core`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from pave_plugins.io import strict_json
from pave_plugins.io.output import Inputs, check_apart, check_output, output_file

log = logging.getLogger(__name__)

PAVE_PAPER = ("PAVE: Purifying task vectors for model merging", "https://arxiv.org/abs/2510.14697")
REGMEAN_PAPER = (
    "Dataless Knowledge Fusion by Merging Weights of Language Models (RegMean; Jin et al., ICLR 2023)",
    "https://arxiv.org/abs/2212.09849",
)
TSV_PAPER = (
    "Task Singular Vectors: Reducing Task Interference in Model Merging (Gargiulo et al., CVPR 2025)",
    "https://arxiv.org/abs/2412.00081",
)

_DTYPES = {
    "float64": torch.float64,
    "double": torch.float64,
    "fp64": torch.float64,
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
}

_MODEL_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


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


def check_run_outputs(algo: Any, inputs: Inputs, **files: str | os.PathLike | None) -> None:
    """Before the merge: every file the run will write (``method.<flag>=path``) and the program's
    ``merged_model_save_path`` are apart from the inputs, and a report is not an existing folder."""
    for flag, path in files.items():
        if path:
            check_output(path, who="pave_plugins (FusionBench)", inputs=inputs, overwrite=True, folder=False,
                         flag=f"method.{flag}")
    save_path = program_save_path(algo)
    if save_path:
        check_apart(save_path, inputs, out_flag="merged_model_save_path")


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


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float64"`` / ``"float32"`` (or a torch dtype) -> torch dtype, with a clear error."""
    if isinstance(name, torch.dtype):
        if name not in (torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be float32 or float64, got {name}")
        return name
    key = str(name).lower().replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(f"compute_dtype must be 'float64' or 'float32', got {name!r}")
    return _DTYPES[key]


SPLITS = ("train", "val", "test")


def pool_split(modelpool: Any, split: str) -> tuple[list[str], Any]:
    """``(dataset names, loader)`` of one split (``train``/``val``/``test``) of a model pool."""
    has = getattr(modelpool, f"has_{split}_dataset")
    names = list(getattr(modelpool, f"{split}_dataset_names")) if has else []
    return names, getattr(modelpool, f"load_{split}_dataset")


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


def algorithm_log_dir(algo) -> str | None:
    """The log directory of a FusionBench algorithm (Fabric logger), or None (never creates a Fabric)."""
    fabric = getattr(algo, "_fabric_instance", None)
    if fabric is None:
        return None
    try:
        return algo.log_dir
    except Exception:
        return None


def program_save_path(algo) -> str | None:
    """The merged-model save path of the running ``fusion_bench`` program, with ``{log_dir}`` filled."""
    program = getattr(algo, "_program", None)
    path = getattr(program, "merged_model_save_path", None) if program is not None else None
    if path is None:
        return None
    path = str(path)
    if "{log_dir}" in path:
        log_dir = getattr(program, "log_dir", None)
        if log_dir is None:
            return None
        path = path.format(log_dir=log_dir)
    return path


def program_config_yaml(algo) -> str:
    """The exact Hydra config of the running program (or the method's own config via the API)."""
    program = getattr(algo, "_program", None)
    cfg = getattr(program, "config", None) if program is not None else None
    if cfg is None:
        cfg = OmegaConf.create({"method": OmegaConf.to_container(algo.config, resolve=False)})
    try:
        return OmegaConf.to_yaml(cfg)
    except Exception:
        return str(cfg)


def model_card_path(save_path: str | os.PathLike, is_file: bool | None = None) -> Path:
    """README.md beside a saved model: inside it when it is a folder, next to it when a file
    (``is_file``; guessed from the suffix or an existing file when None)."""
    p = Path(save_path)
    if is_file is None:
        is_file = p.suffix in _MODEL_FILE_SUFFIXES or p.is_file()
    if is_file:
        return p.parent / "README.md"
    return p / "README.md"


def write_model_card(
    save_path: str | os.PathLike,
    *,
    method: str,
    description: str,
    papers: list[tuple[str, str]],
    config_yaml: str,
    details: Mapping[str, Any] | None = None,
    is_file: bool | None = None,
    inputs: Inputs | None = None,
) -> Path:
    """Write a model card naming the method, its papers and the exact Hydra config (atomic)."""
    path = model_card_path(save_path, is_file)
    lines = [
        "---",
        "tags:",
        "- merge",
        "- fusion_bench",
        "- pave_plugins",
        "---",
        f"# Merged model: {method}",
        "",
        description,
        "",
        "## Method and papers",
        "",
    ]
    lines += [f"- {title}: <{url}>" for title, url in papers]
    if details:
        lines += ["", "## Summary", ""]
        lines += [f"- {k}: {v}" for k, v in details.items()]
    lines += [
        "",
        "## Recipe",
        "",
        "Produced with `fusion_bench` (FusionBench 0.2.33) and `pave_plugins`. Exact Hydra config:",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
    ]
    with output_file(path, who="pave_plugins (FusionBench)", inputs=inputs, flag="model card") as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    log.info("model card written to %s", path)
    return path


def write_json(path: str | os.PathLike, data: Any, *, inputs: Inputs | None = None,
               flag: str = "method.report_path") -> Path:
    """A report through the output transaction (never onto or inside an input)."""
    path = Path(path)
    with output_file(path, who="pave_plugins (FusionBench)", inputs=inputs, flag=flag) as tmp:
        tmp.write_text(strict_json.dumps(data, indent=2, sort_keys=False, default=_json_default), encoding="utf-8")
    return path


def _json_default(obj: Any):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (DictConfig,)):
        return OmegaConf.to_container(obj, resolve=True)
    return str(obj)

"""What a FusionBench run of this package writes: where (the program's log dir and save path,
checked apart from the inputs before the merge), JSON reports and model cards."""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from pave_plugins import cards
from pave_plugins import papers as _papers
from pave_plugins.io import strict_json
from pave_plugins.io.output import Inputs, check_apart, check_output, output_file

log = logging.getLogger(__name__)

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


_MODEL_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


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
    tags: Sequence[str] = (),
    modelpool: Any = None,
) -> Path:
    """Write a model card ready to publish (atomic): the Hub metadata (``base_model``: the pool's Hub
    models, never a local path; ``library_name``; ``tags``: ``merge``, ``fusion-bench`` and ``tags``),
    the method, its papers as links and the exact Hydra config with local paths shortened to their
    folder names."""
    path = model_card_path(save_path, is_file)
    paths = [p for values in (inputs or {}).values() for p in values]
    lines = [
        cards.metadata(pool_hub_ids(modelpool), ["merge", "fusion-bench", *tags]) + f"# Merged model: {method}",
        "",
        cards.redact(description, paths),
        "",
        "## Method and papers",
        "",
        *[cards.paper_line(_papers.Paper(*p)) for p in papers],
    ]
    if details:
        lines += ["", "## Summary", ""]
        lines += [f"- {k}: {v}" for k, v in details.items()]
    lines += ["", "## Recipe", "",
              "Produced with `fusion_bench` (FusionBench 0.2.33) and `pave_plugins`. Exact Hydra config:", "",
              *cards.recipe_block(config_yaml, paths)]
    with output_file(path, who="pave_plugins (FusionBench)", inputs=inputs, flag="model card") as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    log.info("model card written to %s", path)
    return path


def pool_hub_ids(modelpool: Any) -> list[str]:
    """The Hub ids of the pool's models (``_pretrained_`` first), where their configs name one."""
    models = dict(getattr(modelpool, "_models", None) or {})
    order = sorted(models, key=lambda n: n != "_pretrained_")
    refs = [m if isinstance(m, (str, os.PathLike)) else
            m.get("pretrained_model_name_or_path") if isinstance(m, (Mapping, DictConfig)) else None  # a module: none
            for m in (models[n] for n in order)]
    return cards.hub_ids(r for r in refs if isinstance(r, (str, os.PathLike)))


def inner_tags(target: Any) -> list[str]:
    """The tag of a FusionBench method (its ``_target_``), when it is one of the known merges."""
    name = str(target).rsplit(".", 1)[-1].lower()
    for key, tag in _INNER_TAGS:
        if key in name:
            return [tag]
    return []


_INNER_TAGS = (("tsv", "tsv-m"), ("singular", "tsv-m"), ("regmean", "regmean"), ("emr", "emr"), ("dare", "dare"),
               ("ties", "ties"), ("taskarithmetic", "task-arithmetic"), ("simpleaverage", "simple-average"))


def save_tokenizer_with_model(algo: Any) -> None:
    """The program saves the pool's tokenizer (with its chat template) beside the merged model, through
    FusionBench's own ``save_model(save_tokenizer=True)``, when the pool names a tokenizer and the
    user's ``merged_model_save_kwargs`` do not say otherwise."""
    program = getattr(algo, "_program", None)
    pool = getattr(program, "modelpool", None)
    if pool is None or getattr(program, "merged_model_save_path", None) is None or not pool_tokenizer(pool):
        return
    program.merged_model_save_kwargs = {**tokenizer_save_kwargs(pool), **dict(program.merged_model_save_kwargs or {})}


def pool_tokenizer(pool: Any) -> Any:
    """The tokenizer a pool names (``tokenizer:`` of its config), or None."""
    config = getattr(pool, "config", None)
    return config.get("tokenizer") if isinstance(config, (DictConfig, Mapping)) else None


def tokenizer_save_kwargs(pool: Any) -> dict:
    """``{"save_tokenizer": True}`` when ``pool.save_model`` can save the tokenizer the pool names."""
    try:
        takes = "save_tokenizer" in inspect.signature(pool.save_model).parameters
    except (TypeError, ValueError):
        takes = False
    return {"save_tokenizer": True} if takes and pool_tokenizer(pool) else {}


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


def start_run(algo: Any, modelpool: Any, who: str, error: type[Exception]) -> Any:
    """The start of a covariance method's run (``pave/pave``, ``pave/regmean``): the pool checked, its
    inputs recorded on ``algo`` (``_run_inputs``) and every output checked apart from them before any
    work; returns the pool."""
    from .pool import checked_pool, pool_inputs

    modelpool = checked_pool(modelpool, who, error)
    algo._run_inputs = pool_inputs(modelpool, covariances=algo.covariances)
    try:
        check_run_outputs(algo, algo._run_inputs, report_path=algo.report_path)
    except OSError as exc:
        raise error(f"{who}: {exc}") from exc
    return modelpool

"""What a FusionBench run of this package writes: where (the program's log dir and save path,
checked apart from the inputs before the merge), JSON reports and model cards."""

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

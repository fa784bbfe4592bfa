"""A small built-in example: tiny Llama models fine-tuned on toy tasks, purified and merged.

Everything is built locally (no hub) and goes through the same code paths a user runs:

1. a random tiny Llama base and K fine-tunes on K synthetic next-token tasks
   ("next token = token + step_k mod V"), saved as Hugging Face folders;
2. per-task input covariances of every linear layer, collected on each *fine-tuned* model with
   :func:`pave_plugins.collect.collect_covariances` and saved as covariance files (``pave collect``);
3. merges with mergekit's own ``run_merge`` (what ``mergekit-yaml`` runs) and the recipes written
   next to the models: stock ``task_arithmetic``, our ``pave`` (inner ``task_arithmetic``, Algorithm 1
   ranks) and our ``tsv`` (TSV-M);
4. next-token accuracy of every model on every task, and the rank report that ``pave`` wrote.

The folder also gets what the README's other commands need (:mod:`pave_plugins.demo.folder`):
calibration data, recipes for every method (mergekit and FusionBench) and the inputs of ``pave bench``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..engine.settings import DEFAULT_RHO
from ..io.output import output_folder, resolve
from .folder import (
    SEQ,
    VOCAB,
    mergekit_recipes,
    word_tokenizer,
    write_bench_inputs,
    write_calibration,
    write_fusion_bench_configs,
)

logger = logging.getLogger(__name__)


@dataclass
class DemoResult:
    accuracy: dict[str, list[float]]  # model -> per-task accuracy
    model_ratios: list[float]
    ranks: dict[str, list[int]]
    full_ranks: dict[str, int]
    relative_change: float
    seconds: float
    workdir: str | None  # None: a temporary folder, removed


def tiny_llama(seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB + 1,  # + <pad>
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def task_batch(step: int, n: int, generator: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, VOCAB, (n, 1), generator=generator)
    return (start + step * torch.arange(SEQ)) % VOCAB


def accuracy(model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    return float((logits.argmax(-1) == ids[:, 1:]).float().mean())


def fine_tune(model: nn.Module, step: int, steps: int, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        ids = task_batch(step, 32, g)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def merge_with_mergekit(config_yaml: str, out: Path) -> Path:
    """What ``mergekit-yaml recipe.yaml out`` does, in-process (a stock method's card made publishable too)."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from pave_plugins._mergekit_bootstrap import load_plugins
    from pave_plugins.mergekit.card import publishable_card, quiet_torch_dtype
    from pave_plugins.mergekit.recipe import OUR_METHODS

    load_plugins()  # pave and tsv from the entry points, if the start-up hook has not (PAVE_PLUGINS_DISABLE: none)

    cfg = MergeConfiguration.model_validate(yaml.safe_load(config_yaml))
    with quiet_torch_dtype():
        run_merge(cfg, str(out), options=MergeOptions(quiet=True), config_source=config_yaml)
    if cfg.merge_method not in OUR_METHODS:  # mergekit's own card names this machine's paths
        (out / "README.md").write_text(publishable_card(cfg, config_yaml, out.name), encoding="utf-8")
    return out


def run_demo(
    workdir: str | Path | None = None,
    *,
    num_tasks: int = 3,
    steps: int = 60,
    rho: float = DEFAULT_RHO,
    lam: float = 1.0,
    seed: int = 0,
    overwrite: bool = False,
) -> DemoResult:
    """Build, fine-tune, collect, purify and merge; models, data and recipes go under ``workdir``
    (one output transaction: built beside it, swapped in when complete; ``overwrite`` replaces only
    an earlier demo folder)."""
    # the models are tiny: one thread is faster, and much faster on a busy machine
    from transformers.utils import logging as hf_logging

    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()  # per-file save/load bars of tiny models are noise here
    merge_log = logging.getLogger("pave_plugins.mergekit")
    level = merge_log.level
    try:
        if workdir is None:
            # the folder is removed at the end: the merge log's paths would name files that are gone
            merge_log.setLevel(logging.WARNING)
            with tempfile.TemporaryDirectory(prefix="pave-demo-") as tmp:
                res = _run_demo(Path(tmp), num_tasks, steps, rho, lam, seed)
            res.workdir = None
            return res
        with output_folder(workdir, who="pave demo", overwrite=overwrite) as stage:
            res = _run_demo(stage, num_tasks, steps, rho, lam, seed, final=resolve(workdir))
            relocate_text(stage, resolve(workdir))
        res.workdir = str(resolve(workdir))
        return res
    finally:
        merge_log.setLevel(level)
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()


#: the text files of the demo folder that name paths inside it (recipes, configs, reports, model cards)
TEXT_SUFFIXES = (".yaml", ".yml", ".json", ".md")


def relocate_text(stage: Path, final: Path) -> None:
    """The folder was built at ``stage`` and will be moved to ``final``: the paths its recipes,
    configs, reports and model cards name are rewritten to ``final``."""
    old, new = str(stage.resolve()), str(final)
    for path in sorted(stage.rglob("*")):
        if path.suffix in TEXT_SUFFIXES and path.is_file():
            text = path.read_text(encoding="utf-8")
            if old in text:
                path.write_text(text.replace(old, new), encoding="utf-8")


# the demo's own merges (recipe name -> label in the printed table)
DEMO_MERGES = {"task_arithmetic": "task arithmetic", "pave_ta": "PAVE + task arithmetic", "tsv_m": "TSV-M"}


def _fine_tunes(root: Path, task_steps: list[int], steps: int, seed: int, g: torch.Generator,
                final: Path) -> tuple[list, list, dict]:
    """Fine-tune, save (with the tokenizer), write calibration data and collect covariances, per task."""
    from ..collect import collect_covariances, model_fingerprint

    tok = word_tokenizer()
    ft_dirs, cov_files, models = [], [], {}
    for k, st in enumerate(task_steps):
        model = fine_tune(tiny_llama(seed), st, steps, seed + 1 + k)
        ft_dir = root / f"ft_task_{k}"
        model.save_pretrained(ft_dir)
        tok.save_pretrained(ft_dir)
        # task k's calibration data, and its covariances fed to fine-tuned model k (PAVE Sec. 3.2)
        calib = task_batch(st, 32, g)
        write_calibration(root / "data" / f"task_{k}.jsonl", calib)
        cov_set = collect_covariances(model, [{"input_ids": b} for b in calib.split(16)], progress=False)
        (root / "covs").mkdir(exist_ok=True)
        cov_file = cov_set.save(root / "covs" / f"task_{k}.safetensors", model_path=str(final / ft_dir.name),
                                model_fingerprint=model_fingerprint(model))
        ft_dirs.append(ft_dir)
        cov_files.append(cov_file)
        models[f"fine-tune {k}"] = model
        logger.info("task %d: fine-tuned and %d covariances collected", k, len(cov_set.covariances))
    return ft_dirs, cov_files, models


def _run_demo(root: Path, num_tasks: int, steps: int, rho: float, lam: float, seed: int,
              final: Path | None = None) -> DemoResult:
    """The demo built in ``root``; ``final``: where the folder will be (the covariance files record it)."""
    from transformers import LlamaForCausalLM

    t0 = time.perf_counter()
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    task_steps = [1 + 2 * k for k in range(num_tasks)]
    base = tiny_llama(seed)
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    word_tokenizer().save_pretrained(base_dir)
    g = torch.Generator().manual_seed(seed + 100)
    test_ids = [task_batch(st, 64, g) for st in task_steps]
    ft_dirs, cov_files, models = _fine_tunes(root, task_steps, steps, seed, g, final or root)
    models = {"base": base, **models}

    recipes = mergekit_recipes(base_dir, ft_dirs, cov_files, rho, lam)
    (root / "mergekit").mkdir(exist_ok=True)
    for name, config in recipes.items():
        (root / "mergekit" / f"{name}.yaml").write_text(config)
    write_fusion_bench_configs(root, base_dir, ft_dirs, cov_files, rho)
    write_bench_inputs(root, seed)
    for name, label in DEMO_MERGES.items():
        out = merge_with_mergekit(recipes[name], root / "merged" / name)
        models[label] = LlamaForCausalLM.from_pretrained(out).eval()
    report = json.loads((root / "merged" / "pave_ta" / "pave_rank_report.json").read_text())
    acc = {name: [accuracy(m, ids) for ids in test_ids] for name, m in models.items()}
    ranks, full_ranks, changes = _ranks_from_report(report, len(ft_dirs))
    return DemoResult(
        accuracy=acc,
        model_ratios=[float(r) for r in _model_ratios(report, len(ft_dirs))],
        ranks=ranks,
        full_ranks=full_ranks,
        relative_change=sum(changes) / max(len(changes), 1),
        seconds=time.perf_counter() - t0,
        workdir=str(root),
    )


def _ranks_from_report(report: dict, k: int) -> tuple[dict[str, list[int]], dict[str, int], list[float]]:
    """Per purified tensor the rank of each model and the full rank, from ``pave_rank_report.json``."""
    ranks: dict[str, list[int]] = {}
    full: dict[str, int] = {}
    changes: list[float] = []
    order = report["models"]
    for name, rec in report["tensors"].items():
        if not rec.get("purified"):
            continue
        per_model = rec["models"]
        ranks[name] = [int(per_model[m]["rank"]) for m in order]
        full[name] = int(per_model[order[0]]["full_rank"])
        changes += [float(per_model[m]["relative_change"]) for m in order]
    return ranks, full, changes


def _model_ratios(report: dict, k: int) -> list[float]:
    return [report["model_ratios"][m] for m in report["models"]]


def format_result(res: DemoResult) -> str:
    k = len(res.model_ratios)
    lines = ["", "Next-token accuracy per task (%):", f"{'model':<26}" + "".join(f"{'task ' + str(i):>9}" for i in range(k)) + f"{'mean':>9}"]
    for name, accs in res.accuracy.items():
        lines.append(f"{name:<26}" + "".join(f"{100 * a:9.1f}" for a in accs) + f"{100 * sum(accs) / k:9.1f}")
    lines += ["", "Spectral rank allocation (Algorithm 1), rank kept per model / full rank:"]
    for layer, ranks in list(res.ranks.items())[:6]:
        lines.append(f"  {layer:<40} {ranks} / {res.full_ranks[layer]}")
    if len(res.ranks) > 6:
        lines.append(f"  ... {len(res.ranks) - 6} more layers")
    lines.append("  per-model preserved rank ratio rho_i (line 15): " + ", ".join(f"{r:.4f}" for r in res.model_ratios))
    lines.append(f"  mean ||dW_PAVE - dW|| / ||dW|| over purified weights: {res.relative_change:.3f}")
    if res.workdir:
        lines.append(f"models, data, covariance files, recipes and the rank report: {res.workdir}")
    else:
        lines.append("nothing kept (pass --out DIR to keep the models, data, covariance files and recipes)")
    lines.append(f"done in {res.seconds:.1f} s")
    return "\n".join(lines)

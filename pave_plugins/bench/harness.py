"""The real offline benchmark harness.

Pipeline, per seed:

1. **Tasks as data**: every task is a folder with ``labels.json`` (``{"labels": [names...]}``) and
   ``train/validation/test.jsonl`` (``{"text": ..., "label": int}``), see
   ``benchmarks/real/build_data.py``.
2. **Frozen zero-shot heads**: each label name is embedded by the *base* encoder (mean pooling
   over the attention mask); logits = ``scale * cos(pooled, label)``. All task knowledge then
   lives in the task vector, as with CLIP heads in the TSV / EMR literature.
3. **Fine-tunes** (cached on disk, outside git): full fine-tuning with frozen word embeddings.
4. **Covariances** ``C = sum_t x_t x_t^T`` at the input of every linear layer of each fine-tuned
   model (PAVE eq. 5), padding excluded, float64.
5. **Merges** through the hosts' code paths (FusionBench algorithms on an in-memory
   ``BaseModelPool``; ours for TSV-M), PAVE purification (eq. 6, ``target="weight"``, or the
   task-vector variant ``target="delta"``) with spectral (Algorithm 1) or uniform rank
   allocation applied to every fine-tune before the merge.
6. **Selection on validation only**: every hyper-parameter (lambda, density, alpha, rho) is
   picked by the mean validation accuracy over tasks; the test split is read once per method.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch

from pave_plugins.io import strict_json
from pave_plugins.io.output import OwnedFolder

from .methods import device_name
from .portable import portable
from .seed_run import SeedRun, threads
from .training import (  # noqa: F401  (re-exported: the harness's public names)
    SPLITS,
    Batch,
    BenchConfig,
    Task,
    accuracy,
    default_cache_dir,
    finetune,
    finetune_key,
    label_head,
    load_base,
    load_task,
    logits,
    make_batches,
    mean_pool,
    predictions,
    task_vector_ratio,
    train_steps,
)

log = logging.getLogger(__name__)

#: the writer named in the ownership record of a ``pave bench`` output folder
BENCH_WHO = "pave bench"


def summarise(per_seed: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Mean and spread over seeds: per-task test accuracy, average, normalised (merged / individual)."""
    keys = list(per_seed[0]["methods"])
    out = {}
    for k in keys:
        rows = [s["methods"][k] for s in per_seed if k in s["methods"]]
        avg = [r["test_avg"] for r in rows]
        norm = []
        for s in per_seed:
            if k in s["methods"]:
                ind = s["methods"]["individual"]["test"]
                norm.append(100.0 * sum(s["methods"][k]["test"][n] / ind[n] for n in names) / len(names))
        per_task = {n: sum(r["test"][n] for r in rows) / len(rows) for n in names}

        def sd(x):
            m = sum(x) / len(x)
            return math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1)) if len(x) > 1 else 0.0

        out[k] = {"label": rows[0]["label"], "per_task": per_task, "avg": sum(avg) / len(avg), "avg_sd": sd(avg),
                  "avg_min": min(avg), "avg_max": max(avg), "norm": sum(norm) / len(norm), "norm_sd": sd(norm),
                  "hp": [r["hp"] for r in rows], "n_seeds": len(rows)}
        rel = [r["pave"]["mean_rel_change"] for r in rows if "pave" in r]
        if rel:
            out[k]["mean_rel_change"] = sum(rel) / len(rel)
    return out


def markdown_table(summary: dict[str, Any], names: list[str]) -> str:
    head = "| method | " + " | ".join(names) + " | avg (± sd) | normalised | chosen hp (per seed) | ‖ΔW_PAVE−ΔW‖/‖ΔW‖ |"
    sep = "|" + "---|" * (len(names) + 5)
    lines = [head, sep]
    for k, s in summary.items():
        hp = "; ".join(",".join(f"{a}={(f'{b:.4g}' if isinstance(b, float) else b)}" for a, b in h.items()) or "–" for h in s["hp"])
        rel = f"{s['mean_rel_change']:.2f}" if "mean_rel_change" in s else ""
        lines.append(f"| {s['label']} | " + " | ".join(f"{s['per_task'][n]:.1f}" for n in names)
                     + f" | {s['avg']:.1f} ± {s['avg_sd']:.1f} | {s['norm']:.1f} | {hp} | {rel} |")
    return "\n".join(lines) + "\n"


def selection_table(per_seed: list[dict[str, Any]]) -> str:
    """PAVE+X chosen on validation (the verdicts) next to the grid point best on test (never a verdict:
    the difference is the size of the selection effect), mean over seeds."""
    keys = [k for k in per_seed[0]["methods"] if "test_selected" in per_seed[0]["methods"][k]]
    if not keys:
        return ""
    lines = ["| PAVE+X | validation-selected test avg | test-selected test avg (not a verdict) | selection effect "
             "| test-selected points (per seed) |", "|---|---|---|---|---|"]
    for k in keys:
        rows = [s["methods"][k] for s in per_seed if k in s["methods"]]
        val_sel = sum(r["test_avg"] for r in rows) / len(rows)
        test_sel = sum(r["test_selected"]["test_avg"] for r in rows) / len(rows)
        points = "; ".join(f"rho={r['test_selected']['rho']:.4g},damping={r['test_selected']['damping']:g},"
                           f"{r['test_selected']['rank_granularity']}" for r in rows)
        lines.append(f"| {rows[0]['label']} | {val_sel:.2f} | {test_sel:.2f} | {test_sel - val_sel:+.2f} | {points} |")
    return ("\nSelection effect: the PAVE grid point best on **test** (rho x damping x rank granularity), beside "
            "the one chosen on validation.\n\n" + "\n".join(lines) + "\n")


def plot(summary: dict[str, Any], folder: OwnedFolder, title: str) -> None:
    """``results.png`` in ``folder``: normalised accuracy of every method, mean ± sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in summary if k != "individual"]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(keys) + 1.5))
    y = list(range(len(keys)))[::-1]
    vals = [summary[k]["norm"] for k in keys]
    errs = [summary[k]["norm_sd"] for k in keys]
    colors = ["tab:gray" if k == "zero_shot" else "tab:orange" if k.startswith("pave") else "tab:blue" for k in keys]
    ax.barh(y, vals, xerr=errs, color=colors, capsize=2)
    ax.set_yticks(y, [summary[k]["label"] for k in keys], fontsize=7)
    ax.axvline(100, color="k", lw=0.8, ls="--")
    ax.set_xlim(min(vals) - 5, 102)
    ax.set_xlabel("normalised test accuracy (merged / individual, %), mean ± sd over seeds")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with folder.file("results.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Run all seeds and write ``results.json``, ``results.md`` and ``results.png`` into ``out_dir``."""
    threads(cfg)
    t0 = time.perf_counter()
    tasks = [load_task(Path(cfg.data_dir) / n) for n in cfg.tasks]
    tok, base = load_base(cfg.model_path)
    base = base.to(cfg.device)  # every model of the run is a copy of it: all the work happens there
    per_seed: list[dict[str, Any]] = []

    def partial(seed_run: "SeedRun") -> None:  # results so far, after every method (a long run can be read early)
        current = {"seed": seed_run.seed, "methods": dict(seed_run.results), "timings": dict(seed_run.timings),
                   "task_vector_ratio": seed_run.tv_ratio, "partial": True}
        if "individual" in current["methods"]:
            write_results(cfg, tasks, per_seed + [current], t0, quiet=True)

    for s in cfg.seeds[:-1]:
        per_seed.append(SeedRun(cfg, s, tasks, tok, base, on_record=partial).run())
        write_results(cfg, tasks, per_seed, t0, quiet=True)
    per_seed.append(SeedRun(cfg, cfg.seeds[-1], tasks, tok, base, on_record=partial).run())
    return write_results(cfg, tasks, per_seed, t0)  # the table, printed once


def add_protocol_results(result: dict[str, Any], per_seed: list[dict], names: list[str]) -> str:
    """Task-vector sizes (mean over seeds) and the paired bootstraps of PAVE+X against X, into
    ``result``; returns their markdown."""
    from .significance import comparisons
    from .significance import markdown as significance_markdown

    ratios = [s["task_vector_ratio"] for s in per_seed if "task_vector_ratio" in s]
    md = ""
    if ratios:
        tv = {n: {part: sum(r[n][part] for r in ratios) / len(ratios) for part in ("all", "linear")} for n in names}
        result["task_vector_ratio"] = tv
        md += ("\n‖τ‖/‖W‖ per task (all encoder parameters; 2-D linear weights), mean over seeds: "
               + ", ".join(f"{n} {v['all']:.4f}; {v['linear']:.4f}" for n, v in tv.items()) + "\n")
    comp = comparisons(per_seed, names) if all("test_correct" in m for s in per_seed for m in s["methods"].values()) \
        else {}
    result["significance"] = comp
    if comp:
        labels = {k: v["label"] for k, v in result["summary"].items()}
        md += ("\nPaired bootstrap over test examples (10 000 replicates, stratified by task, the same examples "
               "for every seed): difference of test accuracy, 95 % percentile interval, two-sided p.\n\n"
               + significance_markdown(comp, labels, names))
    return md


def recorded_config(cfg: BenchConfig, per_seed: list[dict]) -> dict[str, Any]:
    """The configuration as ``results.json`` records it: the PAVE targets, allocations and bases
    narrowed to those that ran (``--methods`` may select fewer than the grids name)."""
    config = dataclasses.asdict(cfg)
    ran = [k.split("_", 3)[1:] for s in per_seed for k in s["methods"] if k.startswith("pave_") and k.count("_") >= 3]
    ran_mk = {k.split("_")[2] for s in per_seed for k in s["methods"] if k.startswith("mergekit_pave_")}
    config["pave_targets"] = [t for t in cfg.pave_targets if t in {r[0] for r in ran} | ran_mk]
    config["pave_allocations"] = [a for a in cfg.pave_allocations if a in {r[1] for r in ran}]
    config["pave_bases"] = [b for b in cfg.pave_bases if b in {r[2] for r in ran}]
    return config


def write_results(cfg: BenchConfig, tasks: list[Task], per_seed: list[dict], t0: float, quiet: bool = False
                  ) -> dict[str, Any]:
    """Write ``results.json``, ``results.md`` and ``results.png`` for the seeds done so far (a seed
    still running carries ``"partial": true`` and is said so in ``results.md``)."""
    names = [t.name for t in tasks]
    summary = summarise(per_seed, names)
    result = {"config": recorded_config(cfg, per_seed), "tasks": {t.name: {"labels": t.labels, "digest": t.digest,
              "sizes": {s: len(t.splits[s]) for s in SPLITS}} for t in tasks},
              "environment": {"python": platform.python_version(), "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "machine": platform.machine(),
                              "processor": platform.processor() or platform.machine(), "device": cfg.device,
                              "device_name": device_name(cfg.device)},
              "per_seed": per_seed, "summary": summary, "total_s": time.perf_counter() - t0}
    extra_md = add_protocol_results(result, per_seed, names) + selection_table(per_seed)
    out = OwnedFolder(cfg.out_dir, who=BENCH_WHO)
    with out.file("results.json") as tmp:  # no machine paths: model as package==version, folders as <labels>
        Path(tmp).write_text(strict_json.dumps(portable(json.loads(strict_json.dumps(result)), cfg), indent=1))
    md = markdown_table(summary, names)
    with out.file("results.md") as tmp:
        Path(tmp).write_text(f"Test accuracy (%), mean over seeds {[p['seed'] for p in per_seed]}; {len(names)} tasks, "
                             f"{cfg.steps}-step fine-tunes ({cfg.protocol}, {cfg.schedule} schedule, word embeddings "
                             f"{'trained' if cfg.train_embeddings else 'frozen'}); hyper-parameters chosen on "
                             "validation." + (" **Partial: a seed is still running.**" if any(p.get("partial") for p in per_seed)
                                              else "") + "\n\n" + md + extra_md)
    try:
        plot(summary, out,
             f"{len(names)} tasks, {cfg.steps}-step fine-tunes, seeds {[p['seed'] for p in per_seed]}")
    except ImportError:
        log.warning("matplotlib not installed: no plot (pip install 'pave-plugins[bench]')")
    if not quiet:
        log.info("wrote %s (%.0f s)\n%s", cfg.out_dir, time.perf_counter() - t0, md)
    return result

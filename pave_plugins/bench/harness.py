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

import copy
import dataclasses
import functools
import json
import logging
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pave_plugins.engine.step import CoSVDStore
from pave_plugins.io import strict_json
from pave_plugins.io.output import OwnedFolder

from .portable import portable
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

# --------------------------------------------------------------------------- covariances


def task_covariances(model: nn.Module, tok, task: Task, cfg: BenchConfig):
    """``cfg.cov_examples`` training examples of the task fed to its fine-tuned model, collected
    with :func:`pave_plugins.collect.collect_covariances`."""
    from pave_plugins.collect import collect_covariances as package_collect

    rows = task.splits["train"][: cfg.cov_examples]
    batches = make_batches(tok, rows, cfg.eval_batch_size, cfg.max_length, sort=False, device=cfg.device)
    inputs = [{"input_ids": ids, "attention_mask": mask} for ids, mask, _ in batches]
    return package_collect(model, inputs, progress=False)


# --------------------------------------------------------------------------- PAVE purification of a pool


def pave_purify_pool(base_sd: dict[str, Tensor], ft_sds: Sequence[dict[str, Tensor]], covs: Sequence[Any],
                     *, target: str, allocation: str, rho: float,
                     store: CoSVDStore) -> tuple[list[dict[str, Tensor]], dict[str, float]]:
    """Purified fine-tunes ``theta_pre + dW_PAVE`` (eq. 6) with ranks from Algorithm 1 / uniform,
    through the engine's whole-model run (:meth:`pave_plugins.engine.PaveEngine.run`); ``store``
    keeps each CO-SVD across the ``rho`` grid.

    Returns the purified state dicts and statistics from the rank report (mean and max
    ``||dW_PAVE - dW|| / ||dW||`` over layers and models, rank ratios, budget).
    """
    from pave_plugins.engine import PaveEngine, PaveSettings, purified_weight
    from pave_plugins.io.fit import fitted_source

    settings = PaveSettings(rho=rho, rank_allocation=allocation, target=target, on_fingerprint_mismatch="warn")
    labels = [str(k) for k in range(len(covs))]
    covs = [fitted_source(c, sd, label=lab, on_fingerprint_mismatch=settings.on_fingerprint_mismatch)
            for c, sd, lab in zip(covs, ft_sds, labels)]
    engine = PaveEngine(settings, covs, labels, store=store)
    out = [dict(sd) for sd in ft_sds]

    def write(name: str, step, w_base, w_fts) -> None:
        for k, p in enumerate(step.purifications):
            if p is not None:
                out[k][name] = purified_weight(w_base, p, like=w_fts[k])

    report = engine.run(list(base_sd), lambda name: (base_sd[name], [sd[name] for sd in ft_sds]), write)
    return out, pave_statistics(report.to_dict(), labels)


def pave_statistics(report: dict[str, Any], labels: Sequence[str]) -> dict[str, Any]:
    """The benchmark's summary of a rank report: relative changes (model-major), ratios, budget."""
    purified = [r for r in report["tensors"].values() if r.get("purified")]
    rel = [m["relative_change"] for lab in labels for r in purified
           for m in [r["models"][lab]] if m.get("purified") and math.isfinite(m["relative_change"])]
    ratios = report["model_ratios"]
    return {"mean_rel_change": float(sum(rel) / max(len(rel), 1)), "max_rel_change": float(max(rel, default=0.0)),
            "model_rank_ratios": [float(ratios[lab]) for lab in labels if ratios[lab] is not None],
            "budget_met": not report["budget_not_met"]}


# --------------------------------------------------------------------------- merge methods (host code paths)

Provider = Callable[[str], nn.Module]  # task name -> model to evaluate on it


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device, else the processor's."""
    d = torch.device(device)
    return torch.cuda.get_device_name(d) if d.type == "cuda" else platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def host_fabric(device: str):
    """The Lightning Fabric that the run's FusionBench algorithms compute on (as ``fusion_bench``'s
    ``fabric.accelerator`` would set it)."""
    import lightning as L

    d = torch.device(device)
    return L.Fabric(accelerator="cuda", devices=[d.index or 0]) if d.type == "cuda" else L.Fabric(accelerator="cpu", devices=1)


def on_device(algorithm, cfg: BenchConfig):
    """``algorithm`` (a FusionBench algorithm) set to compute on ``cfg.device``."""
    if hasattr(algorithm, "_fabric_instance"):
        algorithm.fabric = host_fabric(str(cfg.device))
    return algorithm


def _module(base: nn.Module, sd: dict[str, Tensor]) -> nn.Module:
    m = copy.deepcopy(base)
    m.load_state_dict(sd)
    return m.eval()


def _pool(base: nn.Module, base_sd: dict[str, Tensor], sds: Sequence[dict[str, Tensor]], names: Sequence[str]):
    from fusion_bench import BaseModelPool

    models = {"_pretrained_": _module(base, base_sd)}
    for n, sd in zip(names, sds):
        models[n] = _module(base, sd)
    return BaseModelPool(models)


def run_method(kind: str, hp: dict[str, Any], base: nn.Module, base_sd, sds, names, cfg: BenchConfig, seed: int,
               grams: Sequence[Any] | None = None, cov_dir: str | None = None) -> Provider:
    """Merge ``sds`` (fine-tuned or purified state dicts) with host method ``kind`` and ``hp``
    (``grams``: the models' Gram matrices, for FusionBench's RegMean; ``cov_dir``: their covariance
    files, for ours)."""
    pool = _pool(base, base_sd, sds, names)
    if kind == "average":
        from fusion_bench.method import SimpleAverageAlgorithm

        merged = on_device(SimpleAverageAlgorithm(), cfg).run(pool)
    elif kind == "ta":
        from fusion_bench.method import TaskArithmeticAlgorithm

        merged = on_device(TaskArithmeticAlgorithm(scaling_factor=hp["lambda"]), cfg).run(pool)
    elif kind == "ties":
        from fusion_bench.method import TiesMergingAlgorithm

        merged = on_device(TiesMergingAlgorithm(scaling_factor=hp["lambda"], threshold=cfg.ties_threshold,
                                                remove_keys=[], merge_func="sum"), cfg).run(pool)
    elif kind == "dare":
        from fusion_bench.method.dare import DareTaskArithmetic

        torch.manual_seed(seed)
        merged = on_device(DareTaskArithmetic(scaling_factor=hp["lambda"], sparsity_ratio=hp["sparsity"],
                                              only_on_linear_weights=False, rescale=True), cfg).run(pool)
    elif kind == "emr":
        from fusion_bench.method.emr_merging.emr_merging import EMRMerging

        emr = on_device(EMRMerging(), cfg).run(pool)

        def provider(task: str) -> nn.Module:
            emr.set_task(task)
            return emr

        return provider
    elif kind == "regmean":
        from .regmean import regmean_merge

        if grams is None:
            raise ValueError("RegMean needs the models' Gram matrices")
        merged = regmean_merge(pool, names, grams, hp["ratio"])
    elif kind == "regmean_ours":
        from pave_plugins.fusion_bench.regmean import RegMeanAlgorithm

        if cov_dir is None:
            raise ValueError("RegMean needs the models' covariance files")
        # the paper's summed Grams, as the FusionBench reference above is given them
        merged = on_device(RegMeanAlgorithm(covariances=cov_dir, reduce_non_diagonal_ratio=hp["ratio"],
                                            gram_weighting="sum", write_model_card=False), cfg).run(pool)
    elif kind == "tsvm_fb":
        from fusion_bench.method.task_singular_vector.TSVM import TaskSingularVectorMerging

        merged = on_device(TaskSingularVectorMerging(alpha=hp["alpha"], exclude_keys=list(cfg.exclude_keys)),
                           cfg).run(pool)
    elif kind == "tsvm":
        from pave_plugins.fusion_bench.tsv import TSVMerging

        merged = on_device(TSVMerging(alpha=hp["alpha"], exclude_keys=list(cfg.exclude_keys), write_model_card=False),
                           cfg).run(pool)
    else:
        raise ValueError(f"unknown merge method {kind!r}")
    merged = merged.eval()
    return lambda task: merged


def run_pave_host(kind: str, hp: dict[str, Any], target: str, allocation: str, rho: float, base: nn.Module,
                  base_sd, sds, covs: str, names, cfg: BenchConfig, seed: int) -> Provider:
    """PAVE + ``kind`` through FusionBench's ``pave/pave`` algorithm of this package.

    ``covs``: folder of covariance files ``<task>.safetensors`` (as written by ``pave collect``)."""
    from pave_plugins.fusion_bench.pave import PAVEAlgorithm

    inner = {"ta": {"name": "task_arithmetic", "scaling_factor": hp.get("lambda")},
             "ties": {"name": "ties_merging", "scaling_factor": hp.get("lambda"), "threshold": cfg.ties_threshold,
                      "remove_keys": [], "merge_func": "sum"},
             "dare": {"name": "dare/task_arithmetic", "scaling_factor": hp.get("lambda"),
                      "sparsity_ratio": hp.get("sparsity"), "only_on_linear_weights": False, "rescale": True},
             "emr": {"name": "emr_merging/emr_merging"},
             "tsvm": {"name": "pave/tsv_m", "alpha": hp.get("alpha"), "exclude_keys": list(cfg.exclude_keys)},
             # PAVE hands its covariance files to the inner RegMean
             "regmean_ours": {"name": "pave/regmean", "reduce_non_diagonal_ratio": hp.get("ratio"),
                              "gram_weighting": "sum"}}[kind]
    algo = on_device(PAVEAlgorithm(inner=inner, rho=rho, rank_allocation=allocation, target=target,
                                   covariances=covs, write_model_card=False), cfg)
    torch.manual_seed(seed)
    merged = algo.run(_pool(base, base_sd, sds, names))
    if hasattr(merged, "set_task"):
        def provider(task: str) -> nn.Module:
            merged.set_task(task)
            return merged

        return provider
    merged = merged.eval()
    return lambda task: merged


def method_grid(kind: str, cfg: BenchConfig) -> list[dict[str, Any]]:
    if kind == "ta":
        return [{"lambda": v} for v in cfg.ta_grid]
    if kind == "ties":
        return [{"lambda": v} for v in cfg.ties_grid]
    if kind == "dare":
        return [{"lambda": v, "sparsity": s} for s in cfg.dare_sparsity for v in cfg.dare_grid]
    if kind in ("tsvm", "tsvm_fb"):
        return [{"alpha": v} for v in cfg.tsv_grid]
    if kind in ("regmean", "regmean_ours"):
        return [{"ratio": v} for v in cfg.regmean_grid]
    return [{}]


BASE_METHODS = {"average": "simple average", "ta": "Task Arithmetic", "ties": "TIES", "dare": "DARE (TA)",
                "emr": "EMR", "tsvm_fb": "TSV-M (FusionBench)", "tsvm": "TSV-M (ours)",
                "regmean": "RegMean (FusionBench, harness Gram matrices)",
                "regmean_ours": "RegMean (ours, covariance files)"}


# --------------------------------------------------------------------------- the run


def _threads(cfg: BenchConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)


def _subsample(rows, per_class: int | None, num_classes: int):
    if per_class is None:
        return rows
    count = [0] * num_classes
    out = []
    for r in rows:
        if count[r[1]] < per_class:
            count[r[1]] += 1
            out.append(r)
    return out


@dataclass
class Choice:
    """The best point of a hyper-parameter grid on validation (mean accuracy over tasks)."""

    hp: dict[str, Any]
    val: dict[str, float]
    val_avg: float
    merge_s: float
    trace: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)  # PAVE statistics of the chosen rho
    provider: Provider | None = None
    recipe: dict[str, Any] | None = None

    def offer(self, other: "Choice") -> "Choice":
        """The better of the two (ties keep the first), carrying the trace of both."""
        trace = self.trace + other.trace
        best = other if other.val_avg > self.val_avg else self
        return dataclasses.replace(best, trace=trace)


NO_CHOICE = Choice(hp={}, val={}, val_avg=-1.0, merge_s=0.0)


def grid_extension(grid: Sequence[dict[str, Any]], best: dict[str, Any]) -> list[dict[str, Any]]:
    """Points past the edge of ``grid`` when ``best`` sits on it; ``[]`` when it is inside.

    Only the first hyper-parameter is extended (lambda, alpha, ratio; DARE's sparsity stays fixed
    at the chosen value): below the lowest value by half of it, above the highest by the grid's
    last step. Values stay positive; RegMean's ``ratio`` stays at most 1.
    """
    if len(grid) < 2 or not best:
        return []
    name = next(iter(best))
    same = [g for g in grid if all(g.get(k) == v for k, v in best.items() if k != name)]
    values = sorted({float(g[name]) for g in same})
    if len(values) < 2:
        return []
    v = float(best[name])
    if v == values[0]:
        new = values[0] / 2
    elif v == values[-1]:
        new = values[-1] + (values[-1] - values[-2])
        if name == "ratio":
            new = min(new, 1.0)
    else:
        return []
    if new in values or new <= 0:
        return []
    return [{**best, name: round(new, 6)}]


def run_seed(cfg: BenchConfig, seed: int, tasks: list[Task], tok, base: nn.Module) -> dict[str, Any]:
    """Fine-tune, collect, merge with every method, select on validation, evaluate on test."""
    return SeedRun(cfg, seed, tasks, tok, base).run()


class SeedRun:
    """One seed of the benchmark: its data, fine-tunes and results."""

    def __init__(self, cfg: BenchConfig, seed: int, tasks: list[Task], tok, base: nn.Module,
                 on_record: Callable[["SeedRun"], None] | None = None) -> None:
        self.t_start = time.perf_counter()
        self.on_record = on_record
        self.cfg, self.seed, self.tasks, self.tok, self.base = cfg, seed, tasks, tok, base
        self.names = [t.name for t in tasks]
        self.heads = {t.name: label_head(base, tok, t.labels, cfg.max_length) for t in tasks}
        self.val = {t.name: make_batches(tok, _subsample(t.splits["validation"], cfg.val_per_class, t.num_classes),
                                         cfg.eval_batch_size, cfg.max_length, device=cfg.device) for t in tasks}
        self.test = {t.name: make_batches(tok, _subsample(t.splits["test"], cfg.test_per_class, t.num_classes),
                                          cfg.eval_batch_size, cfg.max_length, device=cfg.device) for t in tasks}
        self.base_sd = {k: v.clone() for k, v in base.state_dict().items()}
        self.timings: dict[str, float] = {}
        self.results: dict[str, Any] = {}
        self.selected: dict[str, dict] = {}
        self._covs: tuple[list, Path] | None = None
        t0 = time.perf_counter()
        done = [finetune(base, tok, t, self.heads[t.name], cfg, seed) for t in tasks]
        self.ft_sds = [sd for sd, _ in done]
        self.heads = {t.name: head for t, (_, head) in zip(tasks, done)}  # trained heads: each task's own
        self.timings["finetune_or_load_s"] = time.perf_counter() - t0
        self.tv_ratio = {t.name: task_vector_ratio(self.base_sd, sd) for t, sd in zip(tasks, self.ft_sds)}
        log.info("seed %d ||tau||/||W|| (all parameters): %s", seed,
                 " ".join(f"{n}={r['all']:.4f}" for n, r in self.tv_ratio.items()))

    def wanted(self, method: str) -> bool:
        return not self.cfg.methods or any(method == w or method.startswith(w) for w in self.cfg.methods)

    def evaluate(self, provider: Provider, batches) -> dict[str, float]:
        return {n: accuracy(provider(n), self.heads[n], batches[n], self.cfg.scale) for n in self.names}

    def record(self, key: str, label: str, provider: Provider, hp: dict, val_acc: dict | None, merge_s: float,
               extra=None) -> None:
        t1 = time.perf_counter()
        correct = {n: predictions(provider(n), self.heads[n], self.test[n], self.cfg.scale) for n in self.names}
        te = {n: 100.0 * int(c.sum()) / max(c.numel(), 1) for n, c in correct.items()}
        self.results[key] = {"label": label, "hp": hp, "val": val_acc, "test": te,
                             "test_avg": sum(te.values()) / len(te), "merge_s": merge_s,
                             "test_eval_s": time.perf_counter() - t1, **(extra or {}),
                             # per test example, in the (fixed) order of the test batches: 1 correct, 0 not
                             "test_correct": {n: "".join("1" if b else "0" for b in c.tolist()) for n, c in correct.items()}}
        log.info("seed %d %-34s test avg %.2f  %s  hp=%s", self.seed, label, self.results[key]["test_avg"],
                 " ".join(f"{n}={a:.1f}" for n, a in te.items()), hp)
        if self.on_record is not None:
            self.on_record(self)

    def merge(self, kind: str, hp: dict, sds) -> Provider:
        grams = self.covariances()[0] if kind == "regmean" else None
        cov_dir = str(self.covariances()[1]) if kind == "regmean_ours" else None
        return run_method(kind, hp, self.base, self.base_sd, sds, self.names, self.cfg, self.seed, grams, cov_dir)

    def search(self, kind: str, sds, grid) -> Choice:
        """Evaluate every grid point on validation; the best one, with the trace of all. When the
        best value of a 1-D grid sits on an edge of it, the grid is extended past that edge (at most
        ``cfg.extend_grids`` times) and the extension is recorded in the choice's statistics."""
        best = self._search_points(kind, sds, grid)
        seen = list(grid)
        for _ in range(self.cfg.extend_grids):
            more = grid_extension(seen, best.hp)
            if not more:
                break
            log.warning("%s: best %s on the edge of its grid: extending it with %s", kind, best.hp, more)
            best = best.offer(self._search_points(kind, sds, more))
            seen += more
            best.stats.setdefault("grid_extended", []).extend(more)
        if seen and grid_extension(seen, best.hp):
            best.stats["on_grid_edge"] = True
            log.warning("%s: best %s still on the edge of the (extended) grid", kind, best.hp)
        return best

    def _search_points(self, kind: str, sds, grid) -> Choice:
        best = NO_CHOICE
        for hp in grid:
            t1 = time.perf_counter()
            prov = self.merge(kind, hp, sds)
            merge_s = time.perf_counter() - t1
            va = self.evaluate(prov, self.val)
            mean = sum(va.values()) / len(va)
            best = best.offer(Choice(hp, va, mean, merge_s, [{"hp": hp, "val_avg": mean}]))
        return best

    def covariances(self) -> tuple[list, Path]:
        """Covariances of every fine-tune (once per seed) and the folder of their files."""
        if self._covs is None:
            cfg, seed = self.cfg, self.seed
            t1 = time.perf_counter()
            covs = []
            cov_dir = Path(cfg.cache_dir) / "covariances" / f"s{seed}-{finetune_key(cfg, self.tasks[0], seed, 'cov')}"
            for t, sd in zip(self.tasks, self.ft_sds):
                cs = task_covariances(_module(self.base, sd), self.tok, t, cfg)
                covs.append(cs)
                # the covariance file that `pave collect` would write, for the host paths
                cs.save(cov_dir / f"{t.name}.safetensors", model_path=cfg.model_path, max_length=cfg.max_length)
            self.timings["covariances_s"] = time.perf_counter() - t1
            self._covs = (covs, cov_dir)
        return self._covs

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        self.record("zero_shot", "zero-shot (base)" if self.cfg.protocol == "zero-shot-heads" else
                    "base encoder + each task's trained head", lambda n: self.base, {}, None, 0.0)
        ft_models = {n: _module(self.base, sd) for n, sd in zip(self.names, self.ft_sds)}
        self.record("individual", "individual fine-tunes", ft_models.__getitem__, {}, None, 0.0)
        del ft_models
        self.run_base_methods()
        self.run_lora_dv()
        self.run_pave()
        if self.cfg.protocol == "zero-shot-heads":
            lora_selected = self.run_lora_experts()
            self.run_mergekit_paths(lora_selected)
        elif any(self.wanted(k) for k in ("lora_experts", "mergekit")) and self.cfg.methods:
            log.warning("LoRA experts and mergekit paths run under the zero-shot-heads protocol only: skipped")
        self.timings["seed_total_s"] = time.perf_counter() - self.t_start
        return {"seed": self.seed, "methods": self.results, "timings": self.timings,
                "task_vector_ratio": self.tv_ratio}

    def run_base_methods(self) -> None:
        for kind, label in BASE_METHODS.items():
            if not self.wanted(kind):
                continue
            t1 = time.perf_counter()
            best = self.search(kind, self.ft_sds, method_grid(kind, self.cfg))
            self.selected[kind] = best.hp
            prov = self.merge(kind, best.hp, self.ft_sds)
            self.record(kind, label, prov, best.hp, best.val, best.merge_s,
                        {"val_trace": best.trace, "search_s": time.perf_counter() - t1})

    def run_lora_dv(self) -> None:
        """LoRA-DV spectral rethinking atop TA and TIES (CE on 32 labelled samples per task, or entropy)."""
        for b in ("ta", "ties"):
            for loss in ("ce", "entropy"):
                key = f"loradv_{loss}_{b}"
                if b not in self.selected or not self.wanted(key):
                    continue
                t1 = time.perf_counter()
                merged = self.merge(b, self.selected[b], self.ft_sds)(self.names[0])
                res = lora_dv(merged, self.base_sd, self.tasks, self.tok, self.heads, self.cfg, self.seed, loss)
                what = "CE, 32 labelled/task" if loss == "ce" else "entropy, unlabelled"
                self.record(key, f"LoRA-DV ({what}) on {BASE_METHODS[b]}", lambda n, m=merged: m,
                            dict(self.selected[b]), None, time.perf_counter() - t1,
                            {"rethink_losses": res.losses, "rethink_layers": len(res.layers)})

    # ------------------------------------------------------------------ PAVE + X
    def run_pave(self) -> None:
        """PAVE + X: purify every fine-tune, then the host method X with X's validated
        hyper-parameters; rho chosen on validation."""
        cfg = self.cfg
        if not any(self.wanted(f"pave_{t}_{a}_{b}") for t in cfg.pave_targets for a in cfg.pave_allocations
                   for b in cfg.pave_bases):
            return
        covs, _ = self.covariances()
        store = CoSVDStore()
        for target in cfg.pave_targets:
            for allocation in cfg.pave_allocations:
                bases = [b for b in cfg.pave_bases if self.wanted(f"pave_{target}_{allocation}_{b}") and b in self.selected]
                if not bases:
                    continue
                best = self.choose_rho(bases, covs, target, allocation, store)
                for b, choice in best.items():
                    self.pave_final(b, choice, covs, target, allocation, store)
        del store

    def choose_rho(self, bases, covs, target, allocation, store) -> dict[str, Choice]:
        """For every base method X: the rho of ``cfg.rho_grid`` whose PAVE + X is best on validation."""
        best: dict[str, Choice] = {}
        for rho in self.cfg.rho_grid:
            t2 = time.perf_counter()
            psds, stats = pave_purify_pool(self.base_sd, self.ft_sds, covs, target=target,
                                           allocation=allocation, rho=rho, store=store)
            purify_s = time.perf_counter() - t2
            for b in bases:
                t3 = time.perf_counter()
                prov = self.merge(b, self.selected[b], psds)
                merge_s = time.perf_counter() - t3
                va = self.evaluate(prov, self.val)
                mean = sum(va.values()) / len(va)
                point = Choice({"rho": rho}, va, mean, purify_s + merge_s, [{"rho": rho, "val_avg": mean}], stats)
                best[b] = best.get(b, NO_CHOICE).offer(point)
            del psds
        return best

    def pave_final(self, b: str, choice: Choice, covs, target, allocation, store) -> None:
        """The chosen PAVE + X through the host plugin (FusionBench ``pave/pave``), or the harness's
        core path when asked (``--pave-host-final``) or when the host path fails (said in the JSON)."""
        cfg, rho = self.cfg, choice.hp["rho"]
        t3 = time.perf_counter()
        reason = None if cfg.pave_host_final is None or b in cfg.pave_host_final else \
            "harness core path chosen (--pave-host-final)"
        prov = None
        if reason is None:
            try:
                prov = run_pave_host(b, self.selected[b], target, allocation, rho, self.base, self.base_sd,
                                     self.ft_sds, str(self.covariances()[1]), self.names, cfg, self.seed)
                stats = {**choice.stats, "final_path": "pave_plugins.fusion_bench.PAVEAlgorithm"}
            except Exception as exc:  # keep the run going; say so in the JSON
                log.warning("PAVE host path failed (%s); using the harness's core path", exc)
                reason = str(exc)
        if prov is None:
            psds, _ = pave_purify_pool(self.base_sd, self.ft_sds, covs, target=target,
                                       allocation=allocation, rho=rho, store=store)
            prov = self.merge(b, self.selected[b], psds)
            stats = {**choice.stats, "final_path": f"core ({reason})"}
            del psds
        merge_s = time.perf_counter() - t3
        label = f"PAVE({'eq.6' if target == 'weight' else 'task vec'}, {allocation}) + {BASE_METHODS[b]}"
        self.record(f"pave_{target}_{allocation}_{b}", label, prov, {**self.selected[b], "rho": rho}, choice.val,
                    merge_s, {"pave": stats, "val_trace": choice.trace})

    # ------------------------------------------------------------------ LoRA experts
    def run_lora_experts(self) -> dict[str, tuple[dict, list[Path]]]:
        """LoRA experts of the tasks: individual, merged by TA / TIES / TSV-M (ours and FusionBench's;
        lambda or alpha on validation), and LoRA-DV (CE, ``cfg.calib_per_task`` labelled samples per
        task) on those merges. Returns ``{base method: (chosen hp, adapter folders)}`` for the mergekit
        ``base+adapter`` path."""
        cfg = self.cfg
        keys = ["lora_experts_individual"] + [f"lora_experts_{b}" for b in ("ta", "ties", "tsvm", "tsvm_fb")] \
            + [f"lora_experts_loradv_ce_{b}" for b in ("ta", "ties")] + ["mergekit_lora_ties"]
        if not any(self.wanted(k) for k in keys):
            return {}
        from pave_plugins.bench import hosts

        t1 = time.perf_counter()
        adapters = [hosts.finetune_lora(self.base, self.tok, t, self.heads[t.name], cfg, self.seed) for t in self.tasks]
        lora_sds = [hosts.lora_dense_state_dict(self.base, a) for a in adapters]
        self.timings["lora_experts_s"] = time.perf_counter() - t1
        rank = {"rank": cfg.lora_rank, "lr": cfg.lora_lr}
        if self.wanted("lora_experts_individual"):
            experts = {n: _module(self.base, sd) for n, sd in zip(self.names, lora_sds)}
            self.record("lora_experts_individual", f"LoRA experts (r={cfg.lora_rank}), individual",
                        experts.__getitem__, rank, None, 0.0)
            del experts
        selected = {}
        for b in ("ta", "ties", "tsvm", "tsvm_fb"):
            needed_by = [f"lora_experts_{b}", f"lora_experts_loradv_ce_{b}"] + (["mergekit_lora_ties"] if b == "ties" else [])
            if not any(self.wanted(k) for k in needed_by):
                continue
            t1 = time.perf_counter()
            best = self.search(b, lora_sds, method_grid(b, cfg))
            selected[b] = (best.hp, adapters)
            self.record(f"lora_experts_{b}", f"LoRA experts + {BASE_METHODS[b]}", self.merge(b, best.hp, lora_sds),
                        {**best.hp, **rank}, best.val, best.merge_s,
                        {"val_trace": best.trace, "search_s": time.perf_counter() - t1})
            if b in ("ta", "ties") and self.wanted(f"lora_experts_loradv_ce_{b}"):
                t1 = time.perf_counter()
                merged = self.merge(b, best.hp, lora_sds)(self.names[0])
                res = lora_dv(merged, self.base_sd, self.tasks, self.tok, self.heads, cfg, self.seed, "ce")
                self.record(f"lora_experts_loradv_ce_{b}", f"LoRA-DV (CE) on LoRA experts + {BASE_METHODS[b]}",
                            lambda n, m=merged: m, {**best.hp, **rank}, None, time.perf_counter() - t1,
                            {"rethink_losses": res.losses, "rethink_layers": len(res.layers)})
        return selected

    # ------------------------------------------------------------------ mergekit
    def run_mergekit_paths(self, lora_selected: dict[str, tuple[dict, list[Path]]]) -> None:
        """Merges through mergekit's own ``run_merge`` on Hugging Face folders of the fine-tunes:
        stock ``ties`` (lambda on validation), ``pave`` + ``ties`` for each PAVE target (rho on
        validation, TIES settings of the stock run) and stock ``ties`` on LoRA experts given as
        ``base+adapter`` (mergekit merges the adapters with PEFT; lambda of ``lora_experts_ties``)."""
        cfg = self.cfg
        keys = ["mergekit_ties", "mergekit_lora_ties", "mergekit_regmean"] + \
            [f"mergekit_pave_{t}_ties" for t in cfg.pave_targets]
        if not any(self.wanted(k) for k in keys):
            return
        from pave_plugins.bench import hosts

        t0 = time.perf_counter()
        work = Path(cfg.cache_dir) / "mergekit" / f"s{self.seed}-{finetune_key(cfg, self.tasks[0], self.seed, 'hf')}"
        template = hosts.seqcls_wrapper(self.base)
        base_dir = str(hosts.save_hf_folder(template, self.base_sd, work / "base"))
        ft_dirs = [str(hosts.save_hf_folder(template, sd, work / t.name)) for t, sd in zip(self.tasks, self.ft_sds)]
        self.timings["mergekit_export_s"] = time.perf_counter() - t0
        density = cfg.mergekit_density
        ties_hp: dict = {}
        if any(self.wanted(k) for k in keys if k not in ("mergekit_lora_ties", "mergekit_regmean")):  # the pave runs reuse its lambda
            ties_hp = self.choose_recipe(
                "mergekit_ties", f"mergekit ties (density {density})", work,
                [({"lambda": v, "density": density}, hosts.ties_recipe(base_dir, ft_dirs, v, density))
                 for v in cfg.ties_grid])
        for target in cfg.pave_targets:
            key = f"mergekit_pave_{target}_ties"
            if not self.wanted(key):
                continue
            cov_dir = self.covariances()[1]
            cov_files = [str(cov_dir / f"{n}.safetensors") for n in self.names]
            lam = ties_hp["lambda"]
            self.choose_recipe(
                key, f"mergekit pave({'eq.6' if target == 'weight' else 'task vec'}, spectral) + ties", work,
                [({"lambda": lam, "density": density, "rho": rho},
                  hosts.pave_recipe(base_dir, ft_dirs, cov_files, lam, density, rho, target, "spectral"))
                 for rho in cfg.rho_grid])
        if self.wanted("mergekit_regmean"):
            cov_dir = self.covariances()[1]
            cov_files = [str(cov_dir / f"{n}.safetensors") for n in self.names]
            self.choose_recipe("mergekit_regmean", "mergekit regmean (covariance files)", work,
                               [({"ratio": r}, hosts.regmean_recipe(base_dir, ft_dirs, cov_files, r))
                                for r in cfg.regmean_grid])
        if self.wanted("mergekit_lora_ties") and "ties" in lora_selected:
            hp, adapters = lora_selected["ties"]
            self.choose_recipe(
                "mergekit_lora_ties", "mergekit ties on LoRA experts (base+adapter)", work,
                [({**hp, "density": density},
                  hosts.ties_recipe(base_dir, [f"{base_dir}+{a}" for a in adapters], hp["lambda"], density))])

    def choose_recipe(self, key: str, label: str, work: Path, recipes: list[tuple[dict, dict]]) -> dict:
        """Merge every recipe with mergekit, keep the best on validation, record it; returns its hp."""
        from pave_plugins.bench import hosts

        cfg = self.cfg
        best = NO_CHOICE
        for hp, recipe in recipes:
            t1 = time.perf_counter()
            model = _module(self.base, hosts.run_mergekit(recipe, work, device=cfg.device))
            prov: Provider = lambda task, m=model: m  # noqa: E731
            merge_s = time.perf_counter() - t1
            va = self.evaluate(prov, self.val)
            mean = sum(va.values()) / len(va)
            best = best.offer(Choice(hp, va, mean, merge_s, [{"hp": hp, "val_avg": mean}], provider=prov,
                                     recipe=recipe))
        self.record(key, label, best.provider, best.hp, best.val, best.merge_s,  # type: ignore[arg-type]
                    {"val_trace": best.trace, "recipe": best.recipe})
        return best.hp


def lora_dv(merged: nn.Module, base_sd: dict[str, Tensor], tasks: list[Task], tok, heads: dict[str, Tensor],
            cfg: BenchConfig, seed: int, loss: str):
    """LoRA-DV (eq. 8-13) through :func:`pave_plugins.core.rethink.rethink`, in place on ``merged``.

    Calibration: ``cfg.calib_per_task`` training examples per task (labels used only with CE);
    each batch holds one task's examples and is scored with that task's frozen head.
    """
    from pave_plugins.core.rethink import RethinkConfig, entropy_loss, rethink

    calib = []
    for t in tasks:
        g = torch.Generator().manual_seed(seed + 1000)
        idx = torch.randperm(len(t.splits["train"]), generator=g)[: cfg.calib_per_task].tolist()
        for ids, mask, y in make_batches(tok, [t.splits["train"][i] for i in idx], cfg.calib_per_task,
                                         cfg.max_length, sort=False, device=cfg.device):
            calib.append((t.name, ids, mask, y))

    class _Forward(nn.Module):  # the rethink forward, seen by the harness's ``logits``
        def __init__(self, forward):
            super().__init__()
            self.forward = forward

    def loss_fn(forward, batch):
        name, ids, mask, y = batch
        z = logits(_Forward(forward), heads[name], ids, mask, cfg.scale)
        return F.cross_entropy(z, y) if loss == "ce" else entropy_loss(z)

    layers = [k for k, v in merged.state_dict().items() if v.ndim == 2 and k not in cfg.exclude_keys]
    return rethink(merged, base_sd, calib, loss_fn, layers=layers,
                   config=RethinkConfig(iterations=cfg.rethink_iterations, epochs=cfg.rethink_epochs,
                                        lr=cfg.rethink_lr, seed=seed, progress=False))


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
    _threads(cfg)
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

    for s in cfg.seeds:
        per_seed.append(SeedRun(cfg, s, tasks, tok, base, on_record=partial).run())
        write_results(cfg, tasks, per_seed, t0)
    return write_results(cfg, tasks, per_seed, t0)


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


def write_results(cfg: BenchConfig, tasks: list[Task], per_seed: list[dict], t0: float, quiet: bool = False
                  ) -> dict[str, Any]:
    """Write ``results.json``, ``results.md`` and ``results.png`` for the seeds done so far (a seed
    still running carries ``"partial": true`` and is said so in ``results.md``)."""
    names = [t.name for t in tasks]
    summary = summarise(per_seed, names)
    result = {"config": dataclasses.asdict(cfg), "tasks": {t.name: {"labels": t.labels, "digest": t.digest,
              "sizes": {s: len(t.splits[s]) for s in SPLITS}} for t in tasks},
              "environment": {"python": platform.python_version(), "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "machine": platform.machine(),
                              "processor": platform.processor() or platform.machine(), "device": cfg.device,
                              "device_name": device_name(cfg.device)},
              "per_seed": per_seed, "summary": summary, "total_s": time.perf_counter() - t0}
    extra_md = add_protocol_results(result, per_seed, names)
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
        log.info("wrote %s (%.0f s)\n%s", out, time.perf_counter() - t0, md)
    return result

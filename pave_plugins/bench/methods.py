"""The benchmark's merge methods, through the hosts' own code paths (FusionBench algorithms on an
in-memory pool), PAVE purification of a pool through the engine, and LoRA-DV on a merge."""

from __future__ import annotations

import copy
import functools
import logging
import math
import platform
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pave_plugins.engine.step import CoSVDStore

from .training import (
    BenchConfig,
    Task,
    logits,
    make_batches,
)

log = logging.getLogger(__name__)


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
                     *, target: str, allocation: str, store: CoSVDStore,
                     **pave: Any) -> tuple[list[dict[str, Tensor]], dict[str, float]]:
    """Purified fine-tunes ``theta_pre + dW_PAVE`` (eq. 6) with ranks from Algorithm 1 / uniform,
    through the engine's whole-model run (:meth:`pave_plugins.engine.PaveEngine.run`); ``pave``: the
    grid point's settings (``rho``, ``damping``, ...); ``store`` keeps each CO-SVD across the grid.

    Returns the purified state dicts and statistics from the rank report (mean and max
    ``||dW_PAVE - dW|| / ||dW||`` over layers and models, rank ratios, budget).
    """
    from pave_plugins.engine import PaveEngine, PaveSettings, purified_weight
    from pave_plugins.io.fit import fitted_source

    settings = PaveSettings(rank_allocation=allocation, target=target, on_fingerprint_mismatch="warn", **pave)
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


def run_pave_host(kind: str, hp: dict[str, Any], target: str, allocation: str, pave: dict[str, Any], base: nn.Module,
                  base_sd, sds, covs: str, names, cfg: BenchConfig, seed: int) -> Provider:
    """PAVE + ``kind`` through FusionBench's ``pave/pave`` algorithm of this package (``pave``: its
    settings, ``rho``, ``damping``, ...).

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
    algo = on_device(PAVEAlgorithm(inner=inner, rank_allocation=allocation, target=target,
                                   covariances=covs, write_model_card=False, **pave), cfg)
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

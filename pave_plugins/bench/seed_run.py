"""One seed of the benchmark: fine-tunes, covariances, every method's merge chosen on validation
and evaluated on test."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pave_plugins.engine.step import CoSVDStore

from .choice import NO_CHOICE, Choice, grid_extension
from .methods import (
    BASE_METHODS,
    Provider,
    _module,
    lora_dv,
    method_grid,
    pave_purify_pool,
    run_method,
    run_pave_host,
    task_covariances,
)
from .training import (
    BenchConfig,
    Task,
    accuracy,
    finetune,
    finetune_key,
    label_head,
    make_batches,
    predictions,
    task_vector_ratio,
)

log = logging.getLogger(__name__)


def threads(cfg: BenchConfig) -> None:
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
        hyper-parameters; the PAVE grid point (rho, damping, granularity) chosen on validation."""
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
                best = self.choose_pave_point(bases, covs, target, allocation, store)
                for b, choice in best.items():
                    self.pave_final(b, choice, covs, target, allocation, store)
        del store

    def pave_grid(self) -> list[dict[str, Any]]:
        """PAVE's grid points: ``rho`` x ``damping`` x ``rank_granularity`` (one value each by default)."""
        cfg = self.cfg
        return [{"rho": rho, "damping": damping, "rank_granularity": granularity}
                for granularity in cfg.granularity_grid for damping in cfg.damping_grid for rho in cfg.rho_grid]

    def choose_pave_point(self, bases, covs, target, allocation, store) -> dict[str, Choice]:
        """For every base method X: the point of :meth:`pave_grid` whose PAVE + X is best on validation.
        Each point is also scored on test (``test_selected``: shows the size of the selection effect;
        never used for a choice or a verdict)."""
        best: dict[str, Choice] = {}
        for point in self.pave_grid():
            t2 = time.perf_counter()
            psds, stats = pave_purify_pool(self.base_sd, self.ft_sds, covs, target=target, allocation=allocation,
                                           store=store, damping_rule=self.cfg.damping_rule, **point)
            purify_s = time.perf_counter() - t2
            for b in bases:
                t3 = time.perf_counter()
                prov = self.merge(b, self.selected[b], psds)
                merge_s = time.perf_counter() - t3
                va = self.evaluate(prov, self.val)
                mean = sum(va.values()) / len(va)
                te = self.evaluate(prov, self.test)
                trace = {**point, "val_avg": mean, "test_avg": sum(te.values()) / len(te),
                         "mean_rel_change": stats["mean_rel_change"]}
                best[b] = best.get(b, NO_CHOICE).offer(Choice(dict(point), va, mean, purify_s + merge_s, [trace], stats))
            del psds
        return best

    def pave_final(self, b: str, choice: Choice, covs, target, allocation, store) -> None:
        """The chosen PAVE + X through the host plugin (FusionBench ``pave/pave``), or the harness's
        core path when asked (``--pave-host-final``) or when the host path fails (said in the JSON)."""
        cfg, pave = self.cfg, {**choice.hp, "damping_rule": self.cfg.damping_rule}
        t3 = time.perf_counter()
        reason = None if cfg.pave_host_final is None or b in cfg.pave_host_final else \
            "harness core path chosen (--pave-host-final)"
        prov = None
        if reason is None:
            try:
                prov = run_pave_host(b, self.selected[b], target, allocation, pave, self.base, self.base_sd,
                                     self.ft_sds, str(self.covariances()[1]), self.names, cfg, self.seed)
                stats = {**choice.stats, "final_path": "pave_plugins.fusion_bench.PAVEAlgorithm"}
            except Exception as exc:  # keep the run going; say so in the JSON
                log.warning("PAVE host path failed (%s); using the harness's core path", exc)
                reason = str(exc)
        if prov is None:
            psds, _ = pave_purify_pool(self.base_sd, self.ft_sds, covs, target=target, allocation=allocation,
                                       store=store, **pave)
            prov = self.merge(b, self.selected[b], psds)
            stats = {**choice.stats, "final_path": f"core ({reason})"}
            del psds
        merge_s = time.perf_counter() - t3
        label = f"PAVE({'eq.6' if target == 'weight' else 'task vec'}, {allocation}) + {BASE_METHODS[b]}"
        test_best = max(choice.trace, key=lambda t: t["test_avg"])  # first of equals, as on validation
        selected = {k: test_best[k] for k in ("rho", "damping", "rank_granularity", "test_avg", "val_avg")}
        self.record(f"pave_{target}_{allocation}_{b}", label, prov, {**self.selected[b], **choice.hp}, choice.val,
                    merge_s, {"pave": stats, "val_trace": choice.trace, "test_selected": selected})

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
        from pave_plugins.bench import lora_experts as experts

        t1 = time.perf_counter()
        adapters = [experts.finetune_lora(self.base, self.tok, t, self.heads[t.name], cfg, self.seed) for t in self.tasks]
        lora_sds = [experts.lora_dense_state_dict(self.base, a) for a in adapters]
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
        from pave_plugins.bench import lora_experts as experts

        t0 = time.perf_counter()
        work = Path(cfg.cache_dir) / "mergekit" / f"s{self.seed}-{finetune_key(cfg, self.tasks[0], self.seed, 'hf')}"
        template = experts.seqcls_wrapper(self.base)
        base_dir = str(experts.save_hf_folder(template, self.base_sd, work / "base"))
        ft_dirs = [str(experts.save_hf_folder(template, sd, work / t.name)) for t, sd in zip(self.tasks, self.ft_sds)]
        self.timings["mergekit_export_s"] = time.perf_counter() - t0
        density = cfg.mergekit_density
        ties_hp: dict = {}
        if any(self.wanted(k) for k in keys if k not in ("mergekit_lora_ties", "mergekit_regmean")):  # the pave runs reuse its lambda
            ties_hp = self.choose_recipe(
                "mergekit_ties", f"mergekit ties (density {density})", work,
                [({"lambda": v, "density": density}, experts.ties_recipe(base_dir, ft_dirs, v, density))
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
                  experts.pave_recipe(base_dir, ft_dirs, cov_files, lam, density, rho, target, "spectral"))
                 for rho in cfg.rho_grid])
        if self.wanted("mergekit_regmean"):
            cov_dir = self.covariances()[1]
            cov_files = [str(cov_dir / f"{n}.safetensors") for n in self.names]
            self.choose_recipe("mergekit_regmean", "mergekit regmean (covariance files)", work,
                               [({"ratio": r}, experts.regmean_recipe(base_dir, ft_dirs, cov_files, r))
                                for r in cfg.regmean_grid])
        if self.wanted("mergekit_lora_ties") and "ties" in lora_selected:
            hp, adapters = lora_selected["ties"]
            self.choose_recipe(
                "mergekit_lora_ties", "mergekit ties on LoRA experts (base+adapter)", work,
                [({**hp, "density": density},
                  experts.ties_recipe(base_dir, [f"{base_dir}+{a}" for a in adapters], hp["lambda"], density))])

    def choose_recipe(self, key: str, label: str, work: Path, recipes: list[tuple[dict, dict]]) -> dict:
        """Merge every recipe with mergekit, keep the best on validation, record it; returns its hp."""
        from pave_plugins.bench import lora_experts as experts

        cfg = self.cfg
        best = NO_CHOICE
        for hp, recipe in recipes:
            t1 = time.perf_counter()
            model = _module(self.base, experts.run_mergekit(recipe, work, device=cfg.device))
            prov: Provider = lambda task, m=model: m  # noqa: E731
            merge_s = time.perf_counter() - t1
            va = self.evaluate(prov, self.val)
            mean = sum(va.values()) / len(va)
            best = best.offer(Choice(hp, va, mean, merge_s, [{"hp": hp, "val_avg": mean}], provider=prov,
                                     recipe=recipe))
        self.record(key, label, best.provider, best.hp, best.val, best.merge_s,  # type: ignore[arg-type]
                    {"val_trace": best.trace, "recipe": best.recipe})
        return best.hp

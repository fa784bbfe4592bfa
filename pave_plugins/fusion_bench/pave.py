"""PAVE (arXiv 2510.14697) as a FusionBench algorithm that wraps any task-vector method.

``pave/pave`` purifies every fine-tuned model of the pool, layer by layer, and hands the purified
pool to an inner FusionBench algorithm (``inner:``: task_arithmetic, ties_merging,
emr_merging/emr_merging, dare/*, pave/tsv_m, or any method config / ``_target_`` dict):

1. per ``nn.Linear`` layer l and model i: the context-oriented SVD of ``W_ft C_i`` (eq. 5; or of
   ``dW C_i`` with ``target: delta``), ``core.layer.layer_co_svds``;
2. ranks of the K models for that layer by Algorithm 1 (spectral, budget ``rho``, floor ``gamma``)
   or the uniform baseline, and
3. the purified weight ``W_ft - U_{>r} U_{>r}^T A`` (eq. 6 in residual form), both
   ``core.layer.purify_layer_from_cosvds``; layers at full rank are left bit-for-bit untouched.

Covariances come from files written by ``pave collect`` (``covariances: {model name: file}`` or a
folder holding ``<model name>.safetensors``) or are collected in the run from the model pool's task
data (``n_samples`` examples of task i fed to fine-tuned model i) with
:func:`pave_plugins.collect.collect_covariances`.

Optional progressive full-rank search (PAVE Appendix A.1) evaluates each merge with a task pool,
gives full rank to the task furthest below its individual model, and keeps the best of K
candidates.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import time
from typing import Any, Mapping

import torch
from fusion_bench import BaseAlgorithm, BaseModelPool
from fusion_bench.mixins import LightningFabricMixin, SimpleProfilerMixin, auto_register_config
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pave_plugins import papers
from pave_plugins.engine import DEFAULT_RHO, PaveEngine, PaveSettings, RankReport, purified_weight_from_tail
from pave_plugins.engine.report import REPORT_NAME
from pave_plugins.engine.settings import settings_for
from pave_plugins.io.output import check_apart, output_file
from pave_plugins.io.sources import CovarianceSource, PreparedCache

from .boundary import one_line_errors
from .methods import inner_method_config, run_inner_method
from .outputs import (
    algorithm_log_dir,
    inner_tags,
    program_config_yaml,
    program_save_path,
    save_tokenizer_with_model,
    start_run,
    tokenizer_save_kwargs,
    write_json,
    write_model_card,
)
from .pave_search import PAVEConfigError, ProgressiveSearch, is_modulated
from .pool import (
    POOL_SPLITS,
    covariance_paths,
    covariance_source,
    padding_collate,
    pool_split,
)

log = logging.getLogger(__name__)

@auto_register_config
class PAVEAlgorithm(ProgressiveSearch, SimpleProfilerMixin, LightningFabricMixin, BaseAlgorithm):
    """PAVE purification + spectral rank allocation around any FusionBench task-vector method.

    Args:
        inner: the merging method run on the purified pool: a FusionBench method config name
            (``task_arithmetic``, ``ties_merging``, ``emr_merging/emr_merging``,
            ``dare/task_arithmetic``, ``pave/tsv_m``, ...), a dict with ``_target_``, or a dict with
            ``name`` plus parameter overrides.
        rho: preserved rank ratio of Algorithm 1, in (0, 1]; 1 reproduces the inner method.
        gamma: stopping ratio (default ``rho - (1 - rho) / 2``).
        rank_allocation: ``spectral`` (Algorithm 1) or ``uniform`` (Table 4 baseline).
        target: ``weight`` (eq. 6, the paper) or ``delta`` (CO-SVD of the task vector itself).
        compute_dtype: ``float64`` (default) or ``float32``.
        covariances: ``{model name: covariance file}`` from ``pave collect``, or a folder with
            ``<model name>.safetensors``; ``null`` collects them in the run from the pool's data.
        n_samples, batch_size, covariance_split: in-run collection (examples per task, loader
            batch size, which of the pool's datasets: train / val / test).
        inplace: purify the pool's in-memory fine-tuned models in place instead of copies
            (saves K model copies; the pool's models are changed).
        progressive_search: PAVE Appendix A.1 (needs a task pool), off by default.
        search_metric, search_higher_is_better: score read from the task pool's report per task.
        taskpool: task pool (config or instance) for the search when not run by ``fusion_bench``.
        report_path: JSON rank report (default ``<log_dir>/pave_rank_report.json`` when there is one).
        allow_missing_covariance: a layer some models have a covariance for and others lack is an
            error unless true (then those models keep their plain task vector for that layer).
        on_fingerprint_mismatch: a covariance collected on other weights of the same shapes:
            ``warn`` (default: a pool may hold a re-saved copy), ``error`` or ``ignore``.
        (``rho`` ... ``compute_dtype``, ``allow_missing_covariance`` and ``on_fingerprint_mismatch``
        are :class:`pave_plugins.engine.PaveSettings`, declared there; a test checks this signature
        and ``pave.yaml`` against it.)
        write_model_card: README.md beside a saved merged model (method, papers, Hydra config).
    """

    def __init__(
        self,
        inner: Any = "task_arithmetic",
        rho: float = DEFAULT_RHO,
        gamma: float | None = None,
        rank_allocation: str = "spectral",
        target: str = "weight",
        damping: float = 0.0,
        damping_rule: str = "relative",
        rank_granularity: str = "layer",
        full_rank_models: Any = (),
        compute_dtype: str = "float64",
        covariances: Any = None,
        n_samples: int = 512,
        batch_size: int = 8,
        covariance_split: str = "train",
        inplace: bool = False,
        progressive_search: bool = False,
        search_metric: str = "accuracy",
        search_higher_is_better: bool = True,
        taskpool: Any = None,
        report_path: str | None = None,
        write_model_card: bool = True,
        allow_missing_covariance: bool = False,
        on_fingerprint_mismatch: str = "warn",
        **kwargs,
    ):
        super().__init__(**kwargs)
        try:  # the PAVE settings by their one declaration (auto_register_config set them as attributes)
            self._settings = settings_for(PaveSettings, functools.partial(getattr, self), "fusion_bench")
        except ValueError as exc:
            raise PAVEConfigError(f"PAVE: {exc}") from exc
        if isinstance(n_samples, bool) or int(n_samples) != n_samples or int(n_samples) < 1:
            raise PAVEConfigError(f"PAVE: n_samples must be a positive integer, got {n_samples!r}")
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or int(batch_size) < 1:
            raise PAVEConfigError(f"PAVE: batch_size must be a positive integer, got {batch_size!r}")
        if covariance_split not in POOL_SPLITS:
            raise PAVEConfigError(f"PAVE: covariance_split must be train, val or test, got {covariance_split!r}")
        if covariances is not None and not isinstance(covariances, (str, os.PathLike, Mapping, DictConfig)):
            raise PAVEConfigError(
                "PAVE: covariances must be a mapping {model name: covariance file}, a folder, or null; "
                f"got {type(covariances).__name__}"
            )
        if progressive_search and inplace:
            raise PAVEConfigError("PAVE: progressive_search needs the unpurified models; it cannot be used with inplace")
        self._inner_cfg = inner_method_config(inner)  # unknown inner method: clear error now
        self.last_report: dict | None = None

    # ------------------------------------------------------------------ run
    @one_line_errors
    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | dict[str, nn.Module]):
        modelpool = start_run(self, modelpool, "PAVE", PAVEConfigError)
        names = list(modelpool.model_names)
        t_start = time.perf_counter()
        timings: dict[str, float] = {}
        instance = self._instance_pool(modelpool)

        t0 = time.perf_counter()
        with self.profile("load models"):
            base = modelpool.load_pretrained_model()
            originals = {n: modelpool.load_model(n) for n in names}
            for n, m in originals.items():
                if not isinstance(m, nn.Module):
                    raise PAVEConfigError(
                        f"PAVE: model {n!r} loaded as {type(m).__name__}, not a torch module: the inner FusionBench "
                        "method takes whole models, so a lazy pool would hold them all anyway; disable lazy loading, "
                        "or stream one tensor at a time with `pave purify` or mergekit's `pave`"
                    )
            working = {
                n: (copy.deepcopy(m) if instance and not self.inplace else m) for n, m in originals.items()
            }
        timings["load_models_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        sources = self._covariance_sources(modelpool, names, working)
        timings["covariances_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        tails: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = (
            {n: {} for n in names} if self.progressive_search else None
        )
        rank_report = self._purify(base, working, sources, names, tails)
        timings["purify_s"] = time.perf_counter() - t0
        self._inner_sources = sources  # an inner RegMean without covariances of its own reads these
        del sources

        t0 = time.perf_counter()
        candidates = None
        if self.progressive_search:
            result, candidates = self._progressive_search(modelpool, base, originals, working, tails, names, instance)
        else:
            result = self._run_inner(self._pool(base, working))
        timings["inner_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_start
        self._inner_sources = None

        report = self._report(rank_report, timings, candidates)
        result = self._finish(result, report, names)
        return result

    # ----------------------------------------------------------- covariances
    def _instance_pool(self, modelpool: BaseModelPool) -> bool:
        models = getattr(modelpool, "_models", None)
        return models is not None and any(isinstance(models[n], nn.Module) for n in modelpool.model_names)

    def _covariance_sources(self, modelpool, names, working) -> dict[str, CovarianceSource]:
        """One covariance source per model (files, a folder, or collected in the run), each through the
        fit check against its model: layers present, input sizes, fingerprint (a warning)."""
        from pave_plugins.io.fit import fitted_source

        if self.covariances is None:
            sources = {n: self._collect(modelpool, n, working[n]) for n in names}
        else:
            paths = covariance_paths(self.covariances, names, "PAVE", PAVEConfigError)
            sources = {n: covariance_source(n, path, "PAVE", PAVEConfigError) for n, path in paths.items()}
        policy = self._settings.on_fingerprint_mismatch
        return {n: fitted_source(src, working[n], label=n, on_fingerprint_mismatch=policy) for n, src in sources.items()}

    def _collect(self, modelpool: BaseModelPool, name: str, model: nn.Module) -> CovarianceSource:
        """In-run collection: ``n_samples`` examples of task ``name`` fed to fine-tuned model ``name``."""
        split = self.covariance_split
        names, loader = pool_split(modelpool, split)
        if name not in names:
            raise PAVEConfigError(
                f"PAVE: missing covariance for model {name!r}: method.covariances is null and the model pool "
                f"has no {split} dataset named {name!r} (it has {list(names)}). Give "
                "method.covariances={model name: file} from `pave collect`, or add "
                f"{split}_datasets.{name} to the model pool"
            )
        try:
            from pave_plugins.collect import collect_covariances
        except ImportError as exc:
            raise PAVEConfigError(
                f"PAVE: in-run covariance collection needs pave_plugins.collect ({exc}); "
                "collect with `pave collect` and pass method.covariances instead"
            ) from exc
        dataset = loader(name)
        n = min(int(self.n_samples), len(dataset))
        subset = torch.utils.data.Subset(dataset, list(range(n)))
        collate = padding_collate(modelpool)
        batches = torch.utils.data.DataLoader(subset, batch_size=int(self.batch_size), shuffle=False, collate_fn=collate)
        device = self.fabric.device
        before = next(model.parameters()).device
        model.to(device)
        with self.profile("collect covariances"), torch.no_grad():
            log.info("PAVE: collecting covariances of %s on %d examples (%s split)", name, n, split)
            covs = collect_covariances(model, batches)
        model.to(before)
        covs.origin = f"covariances of {name!r} collected from the {split} dataset, {n} samples"
        return covs

    # ------------------------------------------------------------- purify
    def _purify(self, base, working, sources, names, tails) -> RankReport:
        """The engine's whole-model run over the pool's state dicts, weights purified in place
        (layers kept at full rank stay bit-for-bit); ``tails`` keeps eq. 6's low-rank tails for the search."""
        engine = PaveEngine(self._settings, [sources[n] for n in names], names, cache=PreparedCache(),
                            device=self.fabric.device)
        base_sd = base.state_dict()
        states = [working[n].state_dict() for n in names]

        def read(key: str):
            missing = [n for n, sd in zip(names, states) if key not in sd]
            if missing:
                raise PAVEConfigError(f"PAVE: model(s) {missing} have no tensor {key!r} of the base model")
            return base_sd[key], [sd[key] for sd in states]

        def write(key: str, step, w_base, w_fts) -> None:
            for n, w, pur in zip(names, w_fts, step.purifications):
                if pur is None or pur.rank >= pur.full_rank:
                    continue
                w.copy_(purified_weight_from_tail(w.to(self.fabric.device), pur.tail_left, pur.tail_right, w))
                if tails is not None:
                    tails[n][key] = (pur.tail_left.cpu(), pur.tail_right.cpu())
            step.purifications.clear()

        with self.profile("purify"):
            record = {**self._settings.to_dict(), "inner": str(self._inner_cfg._target_)}
            report = engine.run(list(base_sd), read, write, record=record,
                                progress="PAVE purify" if len(base_sd) >= 8 else None)
        if not any(r.get("purified") for r in report.tensors.values()):
            raise PAVEConfigError(
                "PAVE: no linear layer of the model has a covariance (layer names do not match the covariance "
                f"files?); first tensors of the model: {list(base_sd)[:5]}"
            )
        return report

    # -------------------------------------------------------------- inner
    def _pool(self, base: nn.Module, models: dict[str, nn.Module]) -> BaseModelPool:
        return BaseModelPool({"_pretrained_": base, **models})

    def _run_inner(self, pool: BaseModelPool):
        log.info("PAVE: running inner method %s on the purified pool", self._inner_cfg._target_)
        with self.profile("inner method"):
            return run_inner_method(self._inner_cfg, pool, fabric=self._fabric_instance,
                                    covariance_sources=getattr(self, "_inner_sources", None))

    # ---------------------------------------------------------- reporting
    def _report(self, rank_report: RankReport, timings, candidates) -> dict:
        """The engine's rank report, with the inner method, timings and the search's candidates."""
        rank_report.finished = True
        rank_report.extra = {"inner": OmegaConf.to_container(self._inner_cfg, resolve=True), "timings": timings,
                             **({"progressive_search": candidates} if candidates is not None else {})}
        report = rank_report.to_dict()
        log.info("%s", rank_report.summary())
        log.info("PAVE timings: %s", {k: round(v, 3) for k, v in timings.items()})
        self.last_report = report
        path = self.report_path
        if path is None:
            log_dir = algorithm_log_dir(self)
            path = os.path.join(log_dir, REPORT_NAME) if log_dir else None
        if path is not None:
            write_json(path, report, inputs=self._run_inputs)
            log.info("PAVE report written to %s", path)
        fabric = self._fabric_instance
        if fabric is not None and getattr(fabric, "_loggers", None):
            try:
                fabric.log_dict({f"pave/rho_i/{n}": v for n, v in report["model_ratios"].items()})
            except Exception:  # a logger that refuses scalars must not fail the merge
                pass
        return report

    def _model_card(self, save_path: str, names, report, *, file_save: bool) -> None:
        if not self.write_model_card:
            return
        s = self._settings
        cited = [papers.PAVE]
        if "TSV" in str(self._inner_cfg._target_) or "task_singular" in str(self._inner_cfg._target_):
            cited.append(papers.TSV)
        write_model_card(
            save_path,
            method=f"PAVE + {str(self._inner_cfg._target_).rsplit('.', 1)[-1]} (pave_plugins `pave/pave`)",
            description=(
                f"{len(names)} fine-tuned models ({', '.join(names)}) purified with PAVE "
                f"(context-oriented SVD, {s.rank_allocation} rank allocation, rho={s.rho}, "
                f"gamma={s.resolved_gamma:.4g}, target={s.target}) and merged with the inner method "
                f"`{self._inner_cfg._target_}`."
            ),
            papers=cited,
            config_yaml=program_config_yaml(self),
            details={n: f"rho_i={v:.4f}" for n, v in report["model_ratios"].items() if v is not None},
            is_file=file_save,
            inputs=self._run_inputs,
            tags=["pave", *inner_tags(self._inner_cfg._target_)],
            modelpool=self._program.modelpool,
        )

    def _finish(self, result, report, names):
        program = self._program
        save_path = program_save_path(self)
        if is_modulated(result):
            if save_path is not None:
                self.save_modulated(result, save_path, names, program.modelpool, inputs=self._run_inputs)
                self._model_card(save_path, names, report, file_save=False)
                log.info(
                    "PAVE: saved one model per task under %s (the modulated model itself cannot be saved); "
                    "the program's own saving is skipped", save_path,
                )
                program.merged_model_save_path = None
            taskpool = getattr(program, "taskpool", None) if program is not None else None
            if taskpool is not None:
                scores, raw = self.evaluate_per_task(taskpool, result, names)
                report["per_task_evaluation"] = raw
                log.info("PAVE: per-task evaluation of the modulated model: %s", scores)
                return {"pave_per_task_evaluation": raw, "pave_rho_i": report["model_ratios"]}
            return result
        if save_path is not None:
            file_save = type(program.modelpool).save_model is BaseModelPool.save_model
            save_tokenizer_with_model(self)
            self._model_card(save_path, names, report, file_save=file_save)
        return result

    @staticmethod
    def save_modulated(model, save_path: str, names, modelpool: BaseModelPool | None = None,
                       inputs: Mapping[str, Any] | None = None) -> list[str]:
        """Save one model per task of a modulated (EMR) merge: ``<save_path>/<task>``."""
        check_apart(save_path, inputs, out_flag="merged_model_save_path")
        os.makedirs(save_path, exist_ok=True)  # FusionBench's save_model writes into it, not creating it
        paths = []
        for n in names:
            model.set_task(n)
            path = os.path.join(save_path, n)
            if modelpool is not None:
                modelpool.save_model(model.backbone, path, **tokenizer_save_kwargs(modelpool))
            else:
                with output_file(path, who="pave_plugins (FusionBench)", inputs=inputs,
                                 flag="merged_model_save_path") as tmp:
                    torch.save(model.backbone.state_dict(), tmp)
            paths.append(path)
        return paths

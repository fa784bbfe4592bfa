"""RegMean (Jin et al., ICLR 2023, arXiv 2212.09849) as a FusionBench algorithm on covariance files.

``pave/regmean`` reads the Gram matrices ``X^T X`` that ``pave collect`` wrote (one file per
fine-tuned model, the same files PAVE and the mergekit ``regmean`` method read), so one collection
serves both hosts; FusionBench's own ``regmean`` collects its statistics in every run instead. Per
state-dict entry of the pretrained model: linear weights with covariances in every file are merged
by RegMean's closed form, solved in float64 by a Cholesky factorisation
(:class:`pave_plugins.engine.regmean.RegMeanEngine`); every other entry takes the mean of the
fine-tuned models (the paper, and FusionBench's RegMean) or task arithmetic. The merged weights are
written into the pool's pretrained model, which is returned (as FusionBench's RegMean does).

Inside ``pave/pave`` (``inner: pave/regmean``) the covariances default to PAVE's own.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any, Mapping

import torch
from fusion_bench import BaseAlgorithm, BaseModelPool
from fusion_bench.mixins import LightningFabricMixin, SimpleProfilerMixin, auto_register_config
from omegaconf import DictConfig
from torch import nn

from pave_plugins import papers
from pave_plugins.engine.regmean import RegMeanEngine, RegMeanSettings
from pave_plugins.engine.report import RegMeanReport
from pave_plugins.engine.settings import settings_for
from pave_plugins.io.sources import CovarianceSource

from .boundary import one_line_errors
from .outputs import (
    algorithm_log_dir,
    program_config_yaml,
    program_save_path,
    save_tokenizer_with_model,
    start_run,
    write_json,
    write_model_card,
)
from .pool import covariance_paths, covariance_source

log = logging.getLogger(__name__)


class RegMeanConfigError(ValueError):
    """A RegMean parameter or covariance file does not fit the model pool."""


@auto_register_config
class RegMeanAlgorithm(SimpleProfilerMixin, LightningFabricMixin, BaseAlgorithm):
    """RegMean on the covariance files of ``pave collect``.

    Args:
        covariances: ``{model name: covariance file}`` or a folder with ``<model name>.safetensors``
            (``null``: only inside ``pave/pave``, which hands over its own).
        reduce_non_diagonal_ratio: ``a`` of RegMean Sec. 3.3 in [0, 1] (``G~ = a G + (1-a) diag G``);
            1 is the closed form of the regression.
        gram_weighting: ``sum`` (the paper) or ``mean`` (each Gram divided by its token count, as
            FusionBench's RegMean).
        non_linear: ``mean`` (the paper) or ``task_arithmetic`` (base + ``scaling_factor`` x sum of
            task vectors) for the entries RegMean does not regress.
        compute_dtype: ``float64`` (default) or ``float32``.
        report_path: JSON report (default ``<log_dir>/regmean_report.json`` when there is one).
        write_model_card: README.md beside the merged model when the program saves it.
    """

    def __init__(
        self,
        covariances: Any = None,
        reduce_non_diagonal_ratio: float = 1.0,
        gram_weighting: str = "sum",
        non_linear: str = "mean",
        scaling_factor: float = 1.0,
        compute_dtype: str = "float64",
        on_fingerprint_mismatch: str = "warn",
        report_path: str | None = None,
        write_model_card: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        try:
            self._settings = settings_for(RegMeanSettings, functools.partial(getattr, self), "fusion_bench")
        except ValueError as exc:
            raise RegMeanConfigError(f"RegMean: {exc}") from exc
        if covariances is not None and not isinstance(covariances, (str, os.PathLike, Mapping, DictConfig)):
            raise RegMeanConfigError(
                "RegMean: covariances must be a mapping {model name: covariance file} or a folder; "
                f"got {type(covariances).__name__}"
            )
        self.covariance_sources: dict[str, CovarianceSource] | None = None  # set by pave/pave
        self.last_report: dict | None = None

    @one_line_errors
    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | dict[str, nn.Module]):
        modelpool = start_run(self, modelpool, "RegMean", RegMeanConfigError)
        names = list(modelpool.model_names)
        t0 = time.perf_counter()
        with self.profile("load models"):
            base = modelpool.load_pretrained_model()
            models = {n: modelpool.load_model(n) for n in names}
        for n, m in [("_pretrained_", base), *models.items()]:
            if not isinstance(m, nn.Module):
                raise RegMeanConfigError(
                    f"RegMean: model {n!r} loaded as {type(m).__name__}, not a torch module (disable lazy loading)"
                )
        sources = self._sources(names, models)
        engine = RegMeanEngine(self._settings, [sources[n] for n in names], names)
        report = RegMeanReport()
        with self.profile("merge"):
            self._merge(engine, base, models, report)
        report.finished = True
        self._report(report, names, time.perf_counter() - t0)
        save_path = program_save_path(self)
        if save_path is not None:
            save_tokenizer_with_model(self)
        if save_path is not None and self.write_model_card:
            self._model_card(save_path, names, modelpool)
        return base

    def _sources(self, names, models) -> dict[str, CovarianceSource]:
        """One covariance source per model, each through the fit check against its model."""
        from pave_plugins.io.fit import fitted_source

        if self.covariances is not None:
            paths = covariance_paths(self.covariances, names, "RegMean", RegMeanConfigError)
            sources = {n: covariance_source(n, p, "RegMean", RegMeanConfigError) for n, p in paths.items()}
        elif self.covariance_sources is not None:
            sources = {n: self.covariance_sources[n] for n in names}
        else:
            raise RegMeanConfigError(
                "RegMean: method.covariances is null; give {model name: file from `pave collect`} or a folder "
                "of <model name>.safetensors"
            )
        policy = self._settings.on_fingerprint_mismatch
        return {n: fitted_source(src, models[n], label=n, on_fingerprint_mismatch=policy) for n, src in sources.items()}

    def _merge(self, engine: RegMeanEngine, base: nn.Module, models: dict[str, nn.Module], report) -> None:
        """Every state-dict entry of the pretrained model, one at a time, written back in place."""
        device = self.fabric.device
        states = {n: m.state_dict() for n, m in models.items()}
        for key, target in base.state_dict().items():
            w_fts = []
            for n, sd in states.items():
                if key not in sd or sd[key].shape != target.shape:
                    raise RegMeanConfigError(f"RegMean: {key}: model {n!r} has no entry of shape {tuple(target.shape)}")
                w_fts.append(sd[key].to(device))
            merged, record = engine.step(key, w_fts, target.to(device))
            target.copy_(merged.to(target.device, target.dtype))
            report.add_tensor(key, record, self._settings.to_dict(), models=engine.labels)

    def _report(self, report: RegMeanReport, names, seconds: float) -> None:
        data = report.to_dict()
        data["timings"] = {"total_s": seconds}
        log.info("%s\nRegMean took %.2f s", report.summary(), seconds)
        self.last_report = data
        path = self.report_path
        if path is None:
            log_dir = algorithm_log_dir(self)
            path = os.path.join(log_dir, "regmean_report.json") if log_dir else None
        if path is not None:
            write_json(path, data, inputs=self._run_inputs)
            data["report_file"] = str(path)

    def _model_card(self, save_path: str, names, modelpool) -> None:
        s = self._settings
        write_model_card(
            save_path,
            method="RegMean (pave_plugins `pave/regmean`)",
            description=(
                f"{len(names)} fine-tuned models ({', '.join(names)}) merged with RegMean on covariance files of "
                f"`pave collect` (reduce_non_diagonal_ratio={s.reduce_non_diagonal_ratio}, "
                f"gram_weighting={s.gram_weighting}, non_linear={s.non_linear})."
            ),
            papers=[papers.REGMEAN],
            config_yaml=program_config_yaml(self),
            is_file=type(modelpool).save_model is BaseModelPool.save_model,
            inputs=self._run_inputs,
            tags=["regmean"],
            modelpool=modelpool,
        )

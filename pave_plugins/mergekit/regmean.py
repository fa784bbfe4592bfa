"""mergekit merge method ``regmean``: RegMean (Jin et al., ICLR 2023, arXiv 2212.09849) on the
covariance files of ``pave collect``.

Per tensor: a linear weight whose layer has a covariance in every model's file is merged by
RegMean's closed form ``W^T = (sum_i G~_i)^{-1} sum_i G~_i W_i^T`` (``G_i = X_i^T X_i``, the file's
covariance; ``G~_i = a G_i + (1 - a) diag(G_i)``), solved in float64 by a Cholesky factorisation
(:mod:`pave_plugins.engine.regmean`); every other tensor (embeddings, norms, biases) takes the mean
of the models (the paper) or task arithmetic (``non_linear: task_arithmetic``, needs
``base_model``, scaled by ``lambda``). The Gram sum of a shared input (q/k/v, gate/up) is read,
checked and factorised once.

YAML: per model ``covariance`` (required); global ``reduce_non_diagonal_ratio`` (``a``, default 1:
the closed form), ``gram_weighting`` (``sum``: the paper; ``mean``: FusionBench's per-token
average), ``non_linear`` (``mean`` | ``task_arithmetic``), ``lambda``, ``compute_dtype``. A
``base_model`` is optional (only task arithmetic uses it). ``regmean_report.json`` next to the
merged weights records per tensor the damping its Gram sum needed.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    PerInputValues,
    TensorGroup,
)
from pydantic import AfterValidator
from typing_extensions import Annotated

from pave_plugins._mergekit_bootstrap import register_late, when_imported
from pave_plugins.engine.regmean import REGMEAN_URL, RegMeanEngine, RegMeanSettings
from pave_plugins.engine.settings import settings_for

from .covariances import CovarianceStore, check_covariance_path
from .report import current_report, install_output_hooks
from .types import setting_specs

logger = logging.getLogger("pave_plugins.mergekit")


class RegMeanMerge(GroupMergeMethod):
    """The ``regmean`` method; holds the per-merge covariance files and Gram-sum cache."""

    spec = MergeMethodSpec(
        name="regmean",
        pretty_name="RegMean (Dataless Knowledge Fusion by Merging Weights of Language Models)",
        reference_url=REGMEAN_URL,
        contract=InputContract(base=BasePolicy.OPTIONAL, min_non_base=1),
        parameters=(
            ParameterSpec(
                "covariance",
                Annotated[Optional[str], AfterValidator(check_covariance_path)],
                ParameterScope.NON_BASE,
                default=None,
            ),
            *setting_specs(RegMeanSettings),
        ),
    )

    def __init__(self) -> None:
        self.store = CovarianceStore()
        self._engines: dict[tuple, RegMeanEngine] = {}
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._engines.clear()
        self.store.clear()

    def merge_group(self, group: TensorGroup, /, **params: Any) -> torch.Tensor:
        name = group.metadata.name or "tensor"
        entries = group.non_base
        settings = settings_for(RegMeanSettings, params.__getitem__, "mergekit")
        if settings.non_linear == "task_arithmetic" and group.base is None:
            raise ValueError("regmean: non_linear 'task_arithmetic' needs a base_model in the recipe")
        report = current_report("regmean")
        if self.clear not in report.on_close:
            self.clear()  # a new merge: drop the files and caches of the previous one
            report.on_close.append(self.clear)
        engine = self._engine(entries, params["covariance"], settings)
        base = group.base.tensor if group.base is not None else None
        merged, record = engine.step(name, [e.tensor for e in entries], base)
        report.add_tensor(name, record, settings.to_dict(), models=engine.labels)
        if record["regmean"]:
            logger.info("regmean: %s by RegMean (damping %.3g)", name, record["damping"])
        else:
            logger.debug("regmean: %s by %s (%s)", name, record["merged_by"], record["reason"])
        return merged.to(entries[0].tensor.dtype)

    def _engine(self, entries, cov_paths: PerInputValues, settings: RegMeanSettings) -> RegMeanEngine:
        """One engine (and so one Gram-sum cache) per set of models and settings, for the whole merge."""
        paths = [cov_paths.get(e.id) for e in entries]
        missing = [str(e.id) for e, p in zip(entries, paths) if p is None]
        if missing and len(missing) < len(paths):
            raise ValueError(f"regmean: no covariance file for model(s) {missing} (per-model parameter 'covariance')")
        key = (tuple(e.id for e in entries), tuple(paths), settings)
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                if missing:  # as pave does: without any covariance, the plain rule, said once per merge
                    logger.warning("regmean: no model has a covariance file (per-model parameter 'covariance'): every "
                                   "tensor is merged by the plain rule non_linear=%s", settings.non_linear)
                policy = settings.on_fingerprint_mismatch
                sources = [self.store.file(e.id, p, on_fingerprint_mismatch=policy) if p is not None else None
                           for e, p in zip(entries, paths)]
                engine = RegMeanEngine(settings, sources, [str(e.id) for e in entries], cache=self.store.cache)
                self._engines[key] = engine
            return engine


regmean_merge_method = RegMeanMerge()

when_imported("mergekit.io.tasks", install_output_hooks)
register_late(regmean_merge_method)

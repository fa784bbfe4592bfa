"""mergekit merge method ``pave``: PAVE-purified task vectors fed to any mergekit method.

For each tensor (PAVE paper, Sec. 3.2-3.3): every fine-tuned model's weight is purified with its
own covariance, ``dW_PAVE = SVD_r(W_ft C) C^{-1} - W_base`` (eq. 5-6), with ranks chosen across
the K models by spectral rank allocation (Algorithm 1) from the singular values of the same single
SVD; then the ``inner`` method (``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``,
``tsv``, ``regmean``, or any other registered mergekit method) is run, through mergekit's own implementation,
on the purified weights ``W_base + dW_PAVE``: exactly what it would do on purified checkpoints.
Tensors without a covariance (embeddings, norms, biases, heads) keep the plain task vector.

YAML: per model ``weight``, ``covariance`` (a ``pave_plugins.io.covariance`` file), ``density``,
``epsilon``; global ``inner``, ``rho``, ``gamma``, ``rank_allocation``, ``target``, ``lambda``,
``normalize``, ``rescale``, ``int8_mask``, ``alpha``, ``reduce_non_diagonal_ratio``, ``gram_weighting``,
``non_linear`` (the last three for ``inner: regmean``, which uses the same covariance files),
``compute_dtype``, ``allow_missing_covariance``
(default false: a tensor that some models have a covariance for and others lack is an error),
``on_fingerprint_mismatch`` (default ``warn``). The PAVE settings are declared once, in
:class:`pave_plugins.engine.PaveSettings`; their specs here are derived from it.
Inner-method parameters
left unset take the inner method's own defaults.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Optional

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethod,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    PerInputValues,
    TensorEntry,
    TensorGroup,
)
from pydantic import AfterValidator
from typing_extensions import Annotated, Literal

from pave_plugins import papers
from pave_plugins._mergekit_bootstrap import register_late, when_imported
from pave_plugins.engine import PaveEngine, PaveSettings, purified_weight
from pave_plugins.engine.settings import settings_for, table

from .card import install_torch_dtype_filter
from .covariances import CovarianceStore, check_covariance_path
from .recipe import OUR_METHODS, install_lora_cache_check, install_recipe_check
from .report import current_report, install_output_hooks
from .source_names import install_source_names
from .types import OptionalFiniteFloat, setting_specs

logger = logging.getLogger("pave_plugins.mergekit")

PAVE_URL = papers.PAVE.url
# parameters handed to the inner method when it declares them (unset ones: its own default)
# (``covariance``, ``compute_dtype`` and the RegMean parameters serve ``inner: regmean``, which reads the
# same covariance files)
FORWARDED = (
    "weight", "density", "epsilon", "lambda", "normalize", "rescale", "int8_mask", "alpha", "covariance",
    "compute_dtype", "reduce_non_diagonal_ratio", "gram_weighting", "non_linear",
)


def available_inner_methods() -> list[str]:
    from mergekit.merge_methods import registry

    names = {m.spec.name for m in registry.registered_methods()} | {"tsv", "regmean"}
    names.discard("pave")
    return sorted(names)


def _check_inner(name: str) -> str:
    if name == "pave":
        raise ValueError("pave cannot be its own inner method")
    known = available_inner_methods()
    if name not in known:
        raise ValueError(f"unknown inner method {name!r} for pave; choose one of: {', '.join(known)}")
    return name


@functools.lru_cache(maxsize=8)
def _settings(values: tuple) -> PaveSettings:
    """The run's settings from mergekit's ``(name, value)`` pairs, built (and validated) once, not per tensor."""
    return settings_for(PaveSettings, dict(values).__getitem__, "mergekit")


def resolve_inner(name: str) -> MergeMethod:
    """The mergekit method object used as inner method (``tsv`` and ``regmean`` are always ours)."""
    if name == "tsv":
        from .tsv import tsv_merge_method

        return tsv_merge_method
    if name == "regmean":
        from .regmean import regmean_merge_method

        return regmean_merge_method
    from mergekit.merge_methods import registry

    return registry.get(_check_inner(name))


class PaveMerge(GroupMergeMethod):
    """The ``pave`` method; holds the per-merge covariance cache (see :mod:`.covariances`)."""

    spec = MergeMethodSpec(
        name="pave",
        pretty_name="PAVE (Purifying Task Vectors in Knowledge-Aware Subspace)",
        reference_url=PAVE_URL,
        contract=InputContract(base=BasePolicy.REQUIRED),
        parameters=(
            ParameterSpec("weight", OptionalFiniteFloat, ParameterScope.NON_BASE, default=None),
            ParameterSpec(
                "covariance",
                Annotated[Optional[str], AfterValidator(check_covariance_path)],
                ParameterScope.NON_BASE,
                default=None,
            ),
            # this model kept unpurified (PaveSettings.full_rank_models; per model, as mergekit's weight)
            ParameterSpec("full_rank", bool, ParameterScope.NON_BASE, default=False),
            ParameterSpec("density", OptionalFiniteFloat, ParameterScope.NON_BASE, default=None),
            ParameterSpec("epsilon", OptionalFiniteFloat, ParameterScope.NON_BASE, default=None),
            ParameterSpec(
                "inner", Annotated[str, AfterValidator(_check_inner)], ParameterScope.SHARED, default="task_arithmetic"
            ),
            ParameterSpec("lambda", OptionalFiniteFloat, ParameterScope.SHARED, default=None),
            ParameterSpec("normalize", Optional[bool], ParameterScope.SHARED, default=None),
            ParameterSpec("rescale", Optional[bool], ParameterScope.SHARED, default=None),
            ParameterSpec("int8_mask", Optional[bool], ParameterScope.SHARED, default=None),
            ParameterSpec("alpha", OptionalFiniteFloat, ParameterScope.SHARED, default=None),
            # for inner: regmean (unset: RegMean's defaults)
            ParameterSpec("reduce_non_diagonal_ratio", OptionalFiniteFloat, ParameterScope.SHARED, default=None),
            ParameterSpec("gram_weighting", Optional[Literal["sum", "mean"]], ParameterScope.SHARED, default=None),
            ParameterSpec(
                "non_linear", Optional[Literal["mean", "task_arithmetic"]], ParameterScope.SHARED, default=None
            ),
            *setting_specs(PaveSettings),
        ),
    )

    def __init__(self) -> None:
        self.store = CovarianceStore()

    def merge_group(self, group: TensorGroup, /, **params: Any) -> torch.Tensor:
        base_entry = group.base
        assert base_entry is not None  # InputContract(base=REQUIRED)
        name = group.metadata.name or "tensor"
        inner = resolve_inner(params["inner"])
        settings = _settings(self._setting_values(group, params))
        report = current_report()
        if report.on_close_once(self.store.clear):
            self.store.clear()  # a new merge: drop the caches of the previous one

        purified_group, record = self._purify(group, name, settings, params["covariance"])
        report_settings = {"inner": params["inner"], **settings.to_dict()}
        report.add_tensor(name, record, report_settings)
        if record["purified"]:
            ranks = {m: r.get("rank") for m, r in record["models"].items() if r.get("purified")}
            logger.info("pave: purified %s, ranks %s of %d", name, list(ranks.values()), record["full_rank"])
        else:
            logger.debug("pave: %s uses the plain task vector", name)

        supplied = self._inner_parameters(inner, purified_group, params)
        (result,) = inner((purified_group,), parameters=supplied)
        return result.to(base_entry.tensor.dtype)

    @staticmethod
    def _setting_values(group: TensorGroup, params: dict[str, Any]) -> tuple:
        """mergekit's values of the settings table; ``full_rank_models`` from the per-model ``full_rank``."""
        kept = tuple(str(e.id) for e in group.non_base if params["full_rank"].get(e.id))
        return tuple((row.name_for("mergekit"), kept if row.type is tuple else params[row.name_for("mergekit")])
                     for row in table(PaveSettings))

    def _purify(
        self, group: TensorGroup, name: str, settings: PaveSettings, cov_paths: PerInputValues
    ) -> tuple[TensorGroup, dict]:
        base = group.base.tensor  # type: ignore[union-attr]
        entries = group.non_base
        wanted = base.ndim == 2 and base.is_floating_point()
        sources = [
            self.store.file(e.id, cov_paths.get(e.id), on_fingerprint_mismatch=settings.on_fingerprint_mismatch)
            if wanted and cov_paths.get(e.id) is not None else None
            for e in entries
        ]
        engine = PaveEngine(settings, sources, [str(e.id) for e in entries], cache=self.store.cache)
        if settings.rank_granularity == "model" and any(s is not None for s in sources):
            engine.model_ratios = self.store.model_ratios(settings, group.base.id, [e.id for e in entries], sources)  # type: ignore[union-attr]
        step = engine.step(name, base, [e.tensor for e in entries])
        purified = {}
        for e, p in zip(entries, step.purifications):
            if p is not None:
                purified[e.id] = purified_weight(base, p, like=e.tensor)
        step.purifications.clear()  # free the task vectors once the weights are built
        new_entries = tuple(
            TensorEntry(id=e.id, tensor=purified[e.id], is_base=False) if not e.is_base and e.id in purified else e
            for e in group.entries
        )
        return TensorGroup(entries=new_entries, metadata=group.metadata), step.to_dict()

    @staticmethod
    def _inner_parameters(inner: MergeMethod, group: TensorGroup, params: dict[str, Any]) -> dict[str, Any]:
        supplied: dict[str, Any] = {}
        for spec in inner.spec.parameters:
            if spec.name not in FORWARDED:
                continue
            value = params[spec.name]
            if spec.scope == ParameterScope.SHARED:
                if value is not None:
                    supplied[spec.name] = value
                continue
            entries = group.non_base if spec.scope == ParameterScope.NON_BASE else group.entries
            per_input = {}
            for e in entries:
                v = value.get(e.id) if isinstance(value, PerInputValues) else None
                if v is None and not spec.required:
                    v = spec.default
                if v is not None:
                    per_input[e.id] = v
            if per_input:
                supplied[spec.name] = per_input
        return supplied


pave_merge_method = PaveMerge()

# attach the rank report to mergekit's output writer when (and only if) it is imported:
# mergekit.io.tasks pulls in transformers, too heavy for `import mergekit.merge_methods`
when_imported("mergekit.io.tasks", install_output_hooks)
when_imported("mergekit.io.tasks", install_lora_cache_check)
when_imported("mergekit.merge_methods.task_adapter", install_source_names)
# check the recipe (covariance placement, unknown parameter names) when mergekit plans a merge
when_imported("mergekit.plan", install_recipe_check)
install_torch_dtype_filter(OUR_METHODS)
register_late(pave_merge_method)

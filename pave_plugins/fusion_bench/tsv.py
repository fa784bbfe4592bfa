"""TSV-M and TSV-C (Gargiulo et al., CVPR 2025, arXiv 2412.00081) as FusionBench algorithms.

``pave/tsv_m`` gives the same weights as FusionBench's ``task_singular_vector/
TaskSingularVectorMerging`` (same ``alpha`` and ``exclude_keys`` semantics: every 2-D entry of the
state dict not in ``exclude_keys`` goes through TSV-M, the rest takes the mean task vector, a float
alpha scales the merged update, a list of alphas scales each task vector first), computed by
:mod:`pave_plugins.core.tsv` and streamed:

* pool of in-memory models: one state-dict entry at a time (the K task vectors of that entry only);
* pool that loads models (configs / paths): one fine-tuned model at a time, keeping only its top
  ``k = floor(R / T)`` singular triplets per matrix (TSV eq. 5; what TSV-C stores), then the
  Procrustes merge (eq. 6, 9) per matrix. No dense task vector is ever held for all tasks.

Like FusionBench's TSVM, the merged update is added to the pool's pretrained model in place.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import torch
from fusion_bench import BaseAlgorithm, BaseModelPool
from fusion_bench.mixins import LightningFabricMixin, SimpleProfilerMixin, auto_register_config
from torch import Tensor, nn

from pave_plugins import papers
from pave_plugins.core.tsv import (
    TSVFactors,
    components_per_task,
    mean_task_vector,
    merge_tsv_factors,
    top_singular_triplets,
    tsv_merge,
)
from pave_plugins.engine.settings import COMPUTE_DTYPES, compute_dtype_name
from pave_plugins.engine.step import check_finite_weights

from .boundary import one_line_errors
from .outputs import (
    check_run_outputs,
    program_config_yaml,
    program_save_path,
    save_tokenizer_with_model,
    write_model_card,
)
from .pool import checked_pool, pool_inputs

log = logging.getLogger(__name__)


def _alphas(alpha: Any, names: list[str]) -> tuple[float, list[float] | None]:
    """FusionBench semantics: float -> scale the merged update; list -> scale each task vector."""
    if alpha is None:
        return 1.0, None
    if isinstance(alpha, bool):
        raise ValueError(f"alpha must be a number or a list of numbers, got {alpha!r}")
    if isinstance(alpha, (int, float)):
        return float(alpha), None
    if isinstance(alpha, Iterable) and not isinstance(alpha, str):
        values = [float(a) for a in alpha]
        if len(values) != len(names):
            raise ValueError(f"alpha has {len(values)} values but the model pool has {len(names)} models {names}")
        return 1.0, values
    raise ValueError(f"alpha must be a number or a list of numbers, got {alpha!r}")


def instance_models(modelpool: BaseModelPool) -> bool:
    """True when every model of the pool is an in-memory ``nn.Module`` (loading costs nothing)."""
    models = getattr(modelpool, "_models", None)
    if models is None:
        return False
    return all(isinstance(models[n], nn.Module) for n in list(modelpool.model_names) + ["_pretrained_"])


@auto_register_config
class TSVMerging(SimpleProfilerMixin, LightningFabricMixin, BaseAlgorithm):
    """TSV-M (TSV Algorithm 1): per-layer low-rank SVD of task matrices, Procrustes, merge.

    Args:
        alpha: float (scales the merged update; 1.0 in the paper) or one value per model
            (scales each task vector before the SVD), as in FusionBench's TSVM.
        exclude_keys: state-dict keys merged by the mean task vector instead of TSV-M.
        compute_dtype: ``float64`` (default) or ``float32`` for the decompositions.
        write_model_card: write README.md beside the merged model when the program saves it.
    """

    def __init__(
        self,
        alpha: Any = 1.0,
        exclude_keys: list[str] | None = None,
        compute_dtype: str = "float64",
        write_model_card: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)

    @one_line_errors
    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | dict[str, nn.Module]) -> nn.Module:
        modelpool = checked_pool(modelpool, "TSV-M")
        self._run_inputs = pool_inputs(modelpool)
        check_run_outputs(self, self._run_inputs)
        names = list(modelpool.model_names)
        alpha, alpha_list = _alphas(self.alpha, names)
        exclude = set(self.exclude_keys or [])
        dtype = COMPUTE_DTYPES[compute_dtype_name(self.compute_dtype)]
        device = self.fabric.device
        t0 = time.perf_counter()
        with self.profile("load pretrained model"):
            pretrained = modelpool.load_pretrained_model()
        if instance_models(modelpool):
            log.info("TSV-M: %d in-memory models, streaming one state-dict entry at a time", len(names))
            self._merge_streaming(modelpool, pretrained, names, alpha, alpha_list, exclude, dtype, device)
        else:
            log.info("TSV-M: loading %d models one at a time, keeping top-k triplets only", len(names))
            self._merge_sequential(modelpool, pretrained, names, alpha, alpha_list, exclude, dtype, device)
        log.info("TSV-M merged %d models in %.2f s", len(names), time.perf_counter() - t0)
        self.print_profile_summary()
        self._maybe_model_card(len(names))
        return pretrained

    # one entry at a time over in-memory models
    def _merge_streaming(self, modelpool, pretrained, names, alpha, alpha_list, exclude, dtype, device):
        base_sd = pretrained.state_dict()
        with self.profile("load models"):
            ft_sds = [modelpool.load_model(n).state_dict() for n in names]
        for key, base in base_sd.items():
            if not torch.is_floating_point(base):
                continue
            with self.profile("merge"):
                b = base.to(device)
                tvs = []
                for i, sd in enumerate(ft_sds):
                    if key not in sd:
                        raise ValueError(f"model {names[i]!r} has no parameter {key!r}")
                    check_finite_weights(key, base if i == 0 else None, [sd[key]], [names[i]])
                    tv = sd[key].to(device) - b
                    if alpha_list is not None:
                        tv = tv * alpha_list[i]
                    tvs.append(tv)
                if base.ndim == 2 and key not in exclude:
                    update = tsv_merge(tvs, alpha, compute_dtype=dtype)
                else:
                    update = mean_task_vector(tvs, alpha)
                base.add_(update.to(device=base.device, dtype=base.dtype))

    # one model at a time, top-k triplets per matrix
    def _merge_sequential(self, modelpool, pretrained, names, alpha, alpha_list, exclude, dtype, device):
        base_sd = pretrained.state_dict()
        num = len(names)
        us: dict[str, list[Tensor]] = {}
        ss: dict[str, list[Tensor]] = {}
        vs: dict[str, list[Tensor]] = {}
        sums: dict[str, Tensor] = {}
        ks: dict[str, int] = {}
        for i, name in enumerate(names):
            with self.profile("load models"):
                model = modelpool.load_model(name)
            sd = model.state_dict()
            with self.profile("top-k triplets"):
                for key, base in base_sd.items():
                    if not torch.is_floating_point(base):
                        continue
                    if key not in sd:
                        raise ValueError(f"model {name!r} has no parameter {key!r}")
                    check_finite_weights(key, base if i == 0 else None, [sd[key]], [name])
                    tv = sd[key].to(device) - base.to(device)
                    if alpha_list is not None:
                        tv = tv * alpha_list[i]
                    if base.ndim == 2 and key not in exclude:
                        k = ks.setdefault(key, components_per_task(min(base.shape), num))
                        u, s, v = top_singular_triplets(tv, k, compute_dtype=dtype)
                        # stored in float32 (or wider): ~(m + n) k numbers per task and matrix
                        store = torch.promote_types(base.dtype, torch.float32)
                        us.setdefault(key, []).append(u.to(store))
                        ss.setdefault(key, []).append(s.to(store))
                        vs.setdefault(key, []).append(v.to(store))
                    else:
                        acc = tv.to(torch.promote_types(base.dtype, torch.float32))
                        if key in sums:
                            sums[key] += acc
                        else:
                            sums[key] = acc
            del model, sd
        with self.profile("merge"):
            for key, base in base_sd.items():
                if key in us:
                    f = TSVFactors(u=torch.cat(us.pop(key), 1), s=torch.cat(ss.pop(key)), v=torch.cat(vs.pop(key), 1), k=ks[key])
                    update = merge_tsv_factors(f, alpha, out_dtype=base.dtype, compute_dtype=dtype)
                elif key in sums:
                    # alpha * mean_i tau_i from the running sum (core's mean of one tensor)
                    update = mean_task_vector([sums.pop(key)], alpha / num)
                else:
                    continue
                base.add_(update.to(device=base.device, dtype=base.dtype))

    def _maybe_model_card(self, num_models: int) -> None:
        path = program_save_path(self)
        if path is None:
            return
        save_tokenizer_with_model(self)
        if not self.write_model_card:
            return
        write_model_card(
            path,
            method="TSV-M (Task Singular Vectors: Merging), pave_plugins `pave/tsv_m`",
            description=(
                f"{num_models} fine-tuned models merged with TSV-M: per layer, the top floor(R/T) singular "
                "components of each task matrix are concatenated, orthogonalised by Procrustes and "
                f"summed; alpha = {self.alpha}."
            ),
            papers=[papers.TSV],
            config_yaml=program_config_yaml(self),
            inputs=self._run_inputs,
            tags=["tsv-m"],
            modelpool=getattr(self._program, "modelpool", None),
        )


@auto_register_config
class TSVCompression(SimpleProfilerMixin, LightningFabricMixin, BaseAlgorithm):
    """TSV-C (TSV eq. 8): every task vector replaced by its top-``k`` singular components.

    Returns ``{model name: pretrained + alpha * low-rank task vector}`` (2-D entries not in
    ``exclude_keys``; other entries keep their full task vector). ``k`` defaults to
    ``floor(R / T)`` as in the paper; ``rank_ratio`` (0, 1] overrides it with ``ceil(ratio R)``.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        exclude_keys: list[str] | None = None,
        rank_ratio: float | None = None,
        compute_dtype: str = "float64",
        **kwargs,
    ):
        super().__init__(**kwargs)

    @one_line_errors
    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | dict[str, nn.Module]) -> dict[str, nn.Module]:
        from copy import deepcopy

        from pave_plugins.core.tsv import tsv_compress

        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(modelpool)
        if self.rank_ratio is not None and not 0 < float(self.rank_ratio) <= 1:
            raise ValueError(f"rank_ratio must be in (0, 1], got {self.rank_ratio}")
        names = list(modelpool.model_names)
        exclude = set(self.exclude_keys or [])
        dtype = COMPUTE_DTYPES[compute_dtype_name(self.compute_dtype)]
        device = self.fabric.device
        pretrained = modelpool.load_pretrained_model()
        base_sd = pretrained.state_dict()
        out: dict[str, nn.Module] = {}
        for name in names:
            ft = modelpool.load_model(name)
            model = deepcopy(pretrained)
            sd, ft_sd = model.state_dict(), ft.state_dict()
            for key, base in base_sd.items():
                if not torch.is_floating_point(base):
                    continue
                tv = ft_sd[key].to(device) - base.to(device)
                if base.ndim == 2 and key not in exclude:
                    r = min(base.shape)
                    if self.rank_ratio is None:
                        k = components_per_task(r, len(names))
                    else:
                        k = math.ceil(float(self.rank_ratio) * r - 1e-9)
                    k = max(1, min(k, r))
                    left, right = tsv_compress(tv, k, compute_dtype=dtype)
                    tv = left @ right
                sd[key].add_((self.alpha * tv).to(device=base.device, dtype=base.dtype))
            out[name] = model
            del ft
        return out

"""Data-parallel collection under ``torchrun`` / ``accelerate launch``: each rank a shard, one all-reduce.

Each rank collects on its shard of the samples (``data.shard``), then :func:`all_reduce_covariances`
sums covariances, token counts and sample counts over the process group (``torch.distributed``,
any backend: gloo on CPU, nccl on GPUs). The layer maps of all ranks must agree; per-key token
counts are checked against the per-rank counts after the reduction.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from .collector import CollectionError, CovarianceSet

log = logging.getLogger(__name__)


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when none is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str | None = None) -> bool:
    """Initialise the default process group from ``torchrun``'s environment (``WORLD_SIZE`` > 1).

    Returns True when this call created the group (the caller then destroys it). Backend: nccl
    when ``device`` is CUDA, else gloo.
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if (device or "").startswith("cuda") and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    log.info("torch.distributed: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def all_reduce_covariances(cs: CovarianceSet, group: Any = None) -> CovarianceSet:
    """Sum ``cs`` over all ranks of ``group`` in place (and return it); every rank gets the total."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    if world == 1:
        return cs
    mine = {
        "layer_map": cs.layer_map,
        "shapes": {k: list(v.shape) for k, v in cs.covariances.items()},
        "dtype": cs.dtype,
        "counts": cs.counts,
        "n_tokens": cs.n_tokens,
        "n_samples": cs.n_samples,
    }
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    for r, other in enumerate(gathered):
        if other["layer_map"] != cs.layer_map or other["shapes"] != mine["shapes"] or other["dtype"] != cs.dtype:
            diff = sorted(set(other["layer_map"].items()) ^ set(cs.layer_map.items()))[:4]
            raise CollectionError(
                f"rank {r} collected a different covariance layout than rank {dist.get_rank(group)} "
                f"(layer map differs at {diff}, dtype {other['dtype']} vs {cs.dtype}); all ranks must run the same model"
            )
        if other["n_tokens"] == 0:
            raise CollectionError(f"rank {r} saw no token: give at least one sample per rank")
    backend = dist.get_backend(group)
    for k in sorted(cs.covariances):
        t = cs.covariances[k]
        if backend == "nccl" and t.device.type != "cuda":
            tt = t.cuda()
            dist.all_reduce(tt, op=dist.ReduceOp.SUM, group=group)
            t.copy_(tt.cpu())
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    keys = sorted(cs.counts)
    counts = torch.tensor([cs.counts[k] for k in keys] + [cs.n_samples, cs.n_tokens], dtype=torch.int64)
    if backend == "nccl":
        counts = counts.cuda()
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    counts = counts.cpu().tolist()
    expected = [sum(g["counts"][k] for g in gathered) for k in keys]
    if counts[: len(keys)] != expected:  # pragma: no cover - a broken reduction
        raise CollectionError(f"token counts after the all-reduce {counts[:4]} differ from the per-rank sums {expected[:4]}")
    cs.counts = dict(zip(keys, counts[: len(keys)]))
    cs.n_samples, cs.n_tokens = int(counts[-2]), int(counts[-1])
    cs.stats = {**cs.stats, "world_size": world, "tokens_per_rank": [g["n_tokens"] for g in gathered]}
    return cs

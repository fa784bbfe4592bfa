"""Pure-torch maths of the methods. No import of mergekit, fusion_bench or transformers here.

Every function follows the device of the tensors it receives and upcasts internally
(float64 by default) for SVD / eigen-decompositions, returning results in the input dtype.
"""

from .layer import LayerModelError, LayerPurification, layer_co_svds, purify_layer, purify_layer_from_cosvds
from .purify import (
    CoSVD,
    PreparedCovariance,
    Purification,
    activated_pruning_error,
    co_svd,
    prepare_covariance,
    purified_task_vector,
    purified_weight_factors,
    purify,
    purify_from_cosvd,
)
from .rank_allocation import (
    RankAllocation,
    allocate_ranks,
    default_gamma,
    model_rank_ratios,
    spectral_rank_allocation,
    uniform_rank_allocation,
)
from .tsv import mean_task_vector, sti, tsv_compress, tsv_merge

__all__ = [
    "CoSVD",
    "LayerModelError",
    "LayerPurification",
    "PreparedCovariance",
    "Purification",
    "RankAllocation",
    "activated_pruning_error",
    "allocate_ranks",
    "co_svd",
    "default_gamma",
    "layer_co_svds",
    "mean_task_vector",
    "model_rank_ratios",
    "prepare_covariance",
    "purified_task_vector",
    "purified_weight_factors",
    "purify",
    "purify_from_cosvd",
    "purify_layer",
    "purify_layer_from_cosvds",
    "spectral_rank_allocation",
    "sti",
    "tsv_compress",
    "tsv_merge",
    "uniform_rank_allocation",
]

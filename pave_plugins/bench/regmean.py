"""RegMean (Jin et al., ICLR 2023) as the data-aware reference of the benchmark: FusionBench's own
``fusion_bench.method.regmean.RegMeanAlgorithm`` (its merge, ``merging_with_regmean_weights``, with
the non-diagonal reduction), fed with the Gram matrices ``X^T X`` that the harness collected for
PAVE (the same examples, the same fine-tuned models, padding excluded) instead of collecting its
own: FusionBench's RegMean leaves that collection to model-specific subclasses (CLIP, GPT-2) and
has none for a sentence encoder.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from torch import Tensor, nn

log = logging.getLogger(__name__)


def gram_regmean_class():
    """A subclass of FusionBench's ``RegMeanAlgorithm`` whose per-layer weights are given Gram
    matrices (float32, as FusionBench's own hooks accumulate them)."""
    from fusion_bench.method.regmean.regmean import RegMeanAlgorithm

    class GramRegMean(RegMeanAlgorithm):
        def __init__(self, grams: dict[str, Any], **kwargs):
            super().__init__(**kwargs)
            self._grams = grams

        def get_regmean_weights(self, model_name: str, model: nn.Module, train_dataset,
                                linear_modules_to_merge: dict[str, nn.Module]) -> dict[str, Tensor]:
            source = self._grams[model_name]
            out = {}
            for name in linear_modules_to_merge:
                if name in source:
                    out[name] = source.get(name).float()
                else:  # no token reached it: FusionBench averages the layer
                    log.warning("RegMean: no Gram matrix for %s of %s: averaged", name, model_name)
            return out

    return GramRegMean


def regmean_merge(pool, names: Sequence[str], grams: Sequence[Any], reduce_non_diagonal_ratio: float) -> nn.Module:
    """RegMean of the pool's models (``names`` in the pool, ``grams`` their covariance sets)."""
    algo = gram_regmean_class()(grams=dict(zip(names, grams)), num_regmean_examples=0,
                                exclude_param_names_regex=[], reduce_non_diagonal_ratio=reduce_non_diagonal_ratio,
                                weight_transpose=True)
    pool.load_train_dataset = lambda name: None  # the statistics are given: no dataset to read
    return algo.run(pool)

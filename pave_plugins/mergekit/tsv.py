"""mergekit merge method ``tsv``: TSV-M (Gargiulo et al., CVPR 2025, arXiv 2412.00081).

For every 2-D tensor: keep the top ``floor(R / T)`` singular components of each task vector,
concatenate, orthogonalise by Procrustes and merge (TSV Algorithm 1, eq. 4-6, 9;
:func:`pave_plugins.core.tsv_merge`); other tensors (biases, norms) take the mean task vector. The
result is ``theta_pre + alpha * merged``. This is FusionBench's ``TaskSingularVectorMerging``
definition: embeddings and heads are 2-D and are merged by TSV too, unless excluded, here with a
per-tensor ``exclude: true`` (mergekit filters, e.g. ``exclude: [{filter: embed_tokens, value: true},
{value: false}]``), which gives them the mean task vector like FusionBench's ``exclude_keys``.

Embeddings whose vocabularies differ: mergekit itself aligns the vocabulary axis when the recipe
has a ``tokenizer:`` section (rows missing in a model are filled by mergekit); without one it
refuses tensors of different shapes with its own error. Task vectors are formed in float32 (or
float64) even for bf16/fp16 inputs; the output is cast back to the merge dtype.
"""

from __future__ import annotations

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, TensorGroup
from mergekit.merge_methods.easy_define import merge_method

from pave_plugins import papers
from pave_plugins._mergekit_bootstrap import register_late
from pave_plugins.core import mean_task_vector, tsv_merge
from pave_plugins.engine.step import check_finite_weights

from .types import FiniteFloat

TSV_URL = papers.TSV.url


@merge_method(
    name="tsv",
    pretty_name="TSV-M (Task Singular Vectors: Reducing Task Interference in Model Merging)",
    reference_url=TSV_URL,
    contract=InputContract(base=BasePolicy.REQUIRED),
)
def tsv_merge_method(group: TensorGroup, alpha: FiniteFloat = 1.0, exclude: bool = False) -> torch.Tensor:
    base = group.base.tensor  # type: ignore[union-attr]
    if not group.non_base:
        return base
    # never merge NaN or Inf (the same one-line error as pave's)
    check_finite_weights(group.metadata.name or "tensor", base, [e.tensor for e in group.non_base],
                         [str(e.id) for e in group.non_base])
    work = torch.promote_types(base.dtype, torch.float32)
    base_w = base.to(work)
    task_vectors = [e.tensor.to(work) - base_w for e in group.non_base]
    if base.ndim == 2 and not exclude:
        update = tsv_merge(task_vectors, alpha)
    else:
        update = mean_task_vector(task_vectors, alpha)
    return (base_w + update).to(base.dtype)


register_late(tsv_merge_method)

"""The calibration loss of one Hugging Face style batch, for every face of LoRA-DV (``pave rethink``
and FusionBench ``pave/rethink``): one dispatch on the model kind, the maths in
:mod:`pave_plugins.core.rethink`.

A batch is a dict of tensors (``input_ids``, ``attention_mask``, optionally ``labels`` or
``label``, ``decoder_input_ids``):

* sequence classifier (2-D logits): cross-entropy on the labels, or the entropy of the
  predictions (eq. 14);
* seq2seq (``config.is_encoder_decoder``): ``ce`` on the target tokens (labels; pad ids count as
  padding when no label is ``-100``); ``entropy`` at the target positions when labels are given,
  otherwise at the first decoder step (``decoder_input_ids``, or the decoder start token);
* causal LM: position ``i`` predicts token ``i + 1``; ``ce`` on the labelled tokens; ``entropy`` at
  the labelled positions, otherwise over the attention mask.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from pave_plugins.core import rethink as core

NEEDS_LABELS = "loss=ce needs labels in the calibration data (or use loss=entropy)"


def batch_loss(
    forward: core.Forward, batch: Mapping[str, Any], loss: str, *, params: Mapping[str, Tensor] | None = None
) -> Tensor:
    """Calibration loss of one dict batch (see the module doc); ``params`` replaces model tensors
    (e.g. a task's classification head)."""
    if loss not in core.LOSSES:
        raise ValueError(f"loss must be one of {core.LOSSES}, got {loss!r}")
    batch = dict(batch)
    labels = batch.pop("labels", None)
    if labels is None:
        labels = batch.pop("label", None)
    if loss == "ce" and labels is None:
        raise ValueError(NEEDS_LABELS)
    config = getattr(forward.model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return _seq2seq_loss(forward, batch, labels, loss, config, params)
    logits = forward(**batch, params=params).logits
    if logits.ndim == 2:  # sequence classification
        return core.classification_loss(logits, labels if loss == "ce" else None, loss)
    return core.token_loss(logits, labels, loss, shift=True, mask=batch.get("attention_mask"))


def _seq2seq_loss(forward, batch: dict, labels: Tensor | None, loss: str, config, params) -> Tensor:
    pad = getattr(config, "pad_token_id", None)
    if labels is not None:
        if pad is not None and not bool((labels == -100).any()):
            labels = labels.masked_fill(labels == pad, -100)
        if "decoder_input_ids" not in batch:
            batch["decoder_input_ids"] = forward.model.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = forward(**batch, params=params).logits
        return core.token_loss(logits, labels, loss, shift=False)
    if "decoder_input_ids" not in batch:
        start = getattr(config, "decoder_start_token_id", None)
        start = start if start is not None else (pad if pad is not None else 0)
        ids = batch["input_ids"]
        batch["decoder_input_ids"] = torch.full((ids.shape[0], 1), int(start), dtype=torch.long, device=ids.device)
    logits = forward(**batch, params=params).logits
    return core.entropy_loss(logits[:, 0])

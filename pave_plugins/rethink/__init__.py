"""LoRA-DV spectral rethinking for Hugging Face models (the maths is in
:mod:`pave_plugins.core.rethink`): calibration jsonl reading, model kinds (sequence classification,
seq2seq, causal LM), per-task classification heads, PEFT LoRA adapters, batches and losses, saving.
Used by ``pave rethink`` and the FusionBench algorithm ``pave/rethink``."""

from .hf import (
    TASK_TYPES,
    RethinkJob,
    build_batches,
    hf_loss_fn,
    load_lora_adapter,
    model_kind,
    read_calibration,
    run_job,
)
from .losses import batch_loss
from .output import LAMBDA_FILE, save_lambdas

__all__ = [
    "LAMBDA_FILE",
    "TASK_TYPES",
    "batch_loss",
    "save_lambdas",
    "RethinkJob",
    "build_batches",
    "hf_loss_fn",
    "load_lora_adapter",
    "model_kind",
    "read_calibration",
    "run_job",
]

"""Covariance collection: ``C = X^T X`` at the input of every linear layer of a fine-tuned model.

API (used by ``pave collect`` and by the mergekit / FusionBench adapters):

* :func:`collect_covariances` ``(model, batches) -> CovarianceSet`` (in memory; ``.save(path, ...)``);
* :func:`collect_from_texts` ``(model, tokenizer, texts, max_length=..., batch_size=...)``;
* :func:`model_fingerprint` ``(module | state dict | checkpoint dir) -> str``;
* :func:`sum_covariance_files` (collection in parts), :func:`all_reduce_covariances` (torchrun).
"""

from pave_plugins.io.fingerprint import model_fingerprint

from .collector import (
    CollectionError,
    CovarianceCollector,
    CovarianceSet,
    collect_covariances,
    hookable_layers,
    peak_memory,
)
from .data import DataError, load_texts, tokenize_batches
from .distributed import all_reduce_covariances
from .parts import sum_covariance_files
from .pipeline import collect_from_texts, collect_to_file, load_model

__all__ = [
    "DataError",
    "all_reduce_covariances",
    "collect_from_texts",
    "collect_to_file",
    "load_model",
    "load_texts",
    "sum_covariance_files",
    "tokenize_batches",
    "CollectionError",
    "CovarianceCollector",
    "CovarianceSet",
    "collect_covariances",
    "hookable_layers",
    "model_fingerprint",
    "peak_memory",
]

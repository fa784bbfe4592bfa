"""The learned-Lambda file of LoRA-DV, written by every face (``pave rethink``, FusionBench
``pave/rethink``) through one writer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from pave_plugins.core import rethink as core

LAMBDA_FILE = "rethink_lambda.safetensors"
LAMBDA_FORMAT = "pave_plugins.rethink/1"


def save_lambdas(result: core.RethinkResult, path: str | os.PathLike, recipe: Mapping[str, Any] | None = None,
                 *, inputs: Mapping[str, Any] | None = None, flag: str = "--out") -> Path:
    """Learned Lambda per layer and iteration (``<layer>.lambda.<t>``), the singular values they
    scale (``<layer>.sigma.<t>``) and the overall gain (``<layer>.gain``), as safetensors written
    atomically (``recipe``, without its losses, goes into the metadata)."""
    from safetensors.torch import save_file

    from pave_plugins.io.output import output_file

    meta = {"format": LAMBDA_FORMAT}
    if recipe is not None:
        meta["recipe"] = json.dumps({k: v for k, v in recipe.items() if k != "losses"})
    tensors = result.lambda_tensors() or {"_empty": torch.zeros(0)}
    with output_file(path, who="pave rethink", inputs=inputs, flag=flag) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)

"""From a model directory and a data file to a covariance file (what ``pave collect`` runs)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .collector import CovarianceSet, collect_covariances
from .data import load_texts, model_positions, shard, tokenize_batches
from .distributed import all_reduce_covariances, dist_info, init_from_env

log = logging.getLogger(__name__)

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None) -> str:
    """``auto`` -> ``cuda`` (this rank's GPU under torchrun) when available, else ``cpu``."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        return "cpu"
    return device


def load_model(
    path: str | os.PathLike,
    *,
    adapter: str | os.PathLike | None = None,
    device: str = "cpu",
    device_map: str | None = None,
    dtype: str = "auto",
    allow_pickle: bool = False,
) -> nn.Module:
    """Load a transformers model with the class named in its config (so heads are included).

    ``dtype="auto"``: float32 on CPU, the checkpoint's dtype on GPU. ``device_map="auto"`` lets
    accelerate spread a model that does not fit one device (the hooks follow each layer's device).
    ``adapter``: a PEFT adapter directory loaded on top (not merged: covariances are the base
    layers' inputs, named as in the merged model). A pickle checkpoint (``pytorch_model.bin``)
    is refused unless ``allow_pickle``.
    """
    import transformers
    from transformers import AutoConfig

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model directory not found: {path}")
    cfg = AutoConfig.from_pretrained(str(path))
    arch = (getattr(cfg, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModel
    if dtype == "auto":
        torch_dtype: Any = torch.float32 if device == "cpu" and device_map is None else "auto"
    else:
        torch_dtype = _DTYPES[dtype]
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if device_map:
        kwargs["device_map"] = device_map
    from pave_plugins.io.checkpoints import load_pretrained

    model = load_pretrained(cls, path, allow_pickle=allow_pickle, **kwargs)
    if adapter is not None:
        from peft import PeftModel

        from pave_plugins.io.adapters import AdapterError, read_adapter_config

        if not Path(adapter).exists():
            raise FileNotFoundError(f"adapter directory not found: {adapter}")
        read_adapter_config(adapter)
        try:
            model = PeftModel.from_pretrained(model, str(adapter))
        except (RuntimeError, ValueError, KeyError) as exc:  # torch's size mismatch is many lines: keep the first
            first = str(exc).strip().splitlines()[-1 if "size mismatch" in str(exc) else 0].strip()
            raise AdapterError(f"--adapter {adapter} does not fit the model {path} ({first})") from None
    if not device_map:
        model.to(device)
    return model.eval()


def collect_from_texts(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int = 8,
    sort_by_length: bool = True,
    distributed: bool | None = None,
    source: str = "data",
    **collect_kwargs: Any,
) -> CovarianceSet:
    """Tokenise ``texts`` (right padding, truncation at ``max_length``) and collect covariances.

    ``distributed`` (default: whether a ``torch.distributed`` group with more than one rank is
    initialised): this rank takes ``texts[rank::world_size]`` and the result is all-reduced, so
    every rank returns the covariances of all ``texts``. ``source`` names the texts in errors.
    """
    rank, world = dist_info()
    if distributed is None:
        distributed = world > 1
    if distributed and world > 1:
        if len(texts) < world:
            raise ValueError(f"{len(texts)} texts for {world} ranks: give at least one text per rank")
        texts = shard(texts, rank, world)
    batches = tokenize_batches(tokenizer, texts, max_length=max_length, batch_size=batch_size, sort_by_length=sort_by_length,
                               positions=model_positions(getattr(model, "config", None)), source=source)
    collect_kwargs.setdefault("progress", rank == 0)
    cs = collect_covariances(model, batches, **collect_kwargs)
    if distributed and world > 1:
        cs = all_reduce_covariances(cs)
    return cs


def collect_to_file(
    model_path: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    text_field: str | None = None,
    template: str | None = None,
    split: str | None = None,
    n_samples: int | None = 512,
    seed: int = 0,
    max_length: int = 512,
    batch_size: int = 8,
    adapter: str | os.PathLike | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    accumulate_dtype: str = "float64",
    compute_dtype: str | None = None,
    device: str | None = "auto",
    device_map: str | None = None,
    model_dtype: str = "auto",
    accumulate_device: str | None = None,
    allow_pickle: bool = False,
    layer_filter: str | None = None,
    dedupe: bool = True,
    progress: bool = True,
    overwrite: bool = False,
) -> CovarianceSet:
    """Load model + tokenizer, sample texts, collect, write ``out`` atomically (rank 0 under torchrun).

    ``out`` is never one of the inputs (model, adapter, tokenizer, data) nor inside one; an existing
    ``out`` is replaced only with ``overwrite`` and only when it is a covariance file.
    """
    if accumulate_dtype not in ("float64", "float32"):
        raise ValueError(f"--dtype must be float64 or float32, got {accumulate_dtype!r}")
    inputs = {"--model": [model_path], "--adapter": [adapter], "--tokenizer": [tokenizer_path], "--data": [data]}
    check_output_file(out, inputs, overwrite=overwrite)
    texts = load_texts(data, text_field=text_field, template=template, split=split, n_samples=n_samples, seed=seed)
    dev = resolve_device(device)
    created = init_from_env(dev)
    try:
        rank, world = dist_info()
        if not Path(model_path).exists():
            raise FileNotFoundError(f"model directory not found: {model_path}")
        from pave_plugins.io.checkpoints import check_model_config

        check_model_config(model_path)
        tokenizer = _tokenizer(tokenizer_path or model_path)
        model = load_model(model_path, adapter=adapter, device=dev, device_map=device_map, dtype=model_dtype,
                           allow_pickle=allow_pickle)
        log.info("collecting on %d texts (%s), rank %d of %d, device %s", len(texts), data, rank, world, dev)
        cs = collect_from_texts(
            model, tokenizer, texts, source=str(data),
            max_length=max_length, batch_size=batch_size,
            accumulate_dtype=_DTYPES[accumulate_dtype],
            compute_dtype=_DTYPES[compute_dtype] if compute_dtype else None,
            device=None if device_map else dev,
            accumulate_device=accumulate_device,
            layer_filter=layer_filter, dedupe=dedupe,
            progress=progress and rank == 0,
        )
        if rank == 0:
            extra: dict[str, Any] = {
                "data": str(data), "split": split, "text_field": text_field, "template": template,
                "seed": seed, "n_samples_requested": n_samples, "batch_size": batch_size,
                "adapter": str(adapter) if adapter else None, "model_dtype": model_dtype,
                "device": dev, "device_map": device_map, "world_size": world,
            }
            _save(cs, out, model, model_path=model_path, merged_adapter=adapter is not None, max_length=max_length,
                  extra=extra, overwrite=overwrite, inputs=inputs)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        return cs
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _tokenizer(source: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except Exception as exc:
        raise ValueError(f"cannot load a tokenizer from {source} ({exc}); pass --tokenizer") from exc


def check_output_file(out, inputs: dict, *, overwrite: bool) -> None:
    """The covariance file ``out`` (``-o``) is apart from every input and replaces only a covariance
    file, and only with ``overwrite``."""
    from pave_plugins.io.covariance import is_covariance_file
    from pave_plugins.io.output import check_output

    if not out:
        raise ValueError("give the output file with -o/--out")
    check_output(out, who="pave collect", inputs=inputs, overwrite=overwrite, flag="-o/--out", folder=False,
                 replaceable=is_covariance_file)


def _save(cs: CovarianceSet, out, model, *, model_path, merged_adapter: bool, max_length: int, extra: dict,
          overwrite: bool, inputs: dict) -> None:
    """Write the covariance file (atomically) with the fingerprint of the weights it serves."""
    from pave_plugins.io.fingerprint import model_fingerprint

    # an adapter's covariances serve the merged weights: fingerprint those
    if merged_adapter:
        fp = model_fingerprint(model.merge_and_unload())
    elif Path(model_path).is_dir():  # the weights as stored: a half-precision copy in memory rounds differently
        fp = model_fingerprint(model_path)
    else:
        fp = model_fingerprint(model)
    cs.save(out, model_path=str(model_path), model_fingerprint=fp, max_length=max_length, extra=extra,
            overwrite=overwrite, inputs=inputs)
    log.info("wrote %s (%d covariances, %d layers, %d samples, %d tokens)", out,
             len(cs.covariances), len(cs.layer_map), cs.n_samples, cs.n_tokens)

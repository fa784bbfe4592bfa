"""Tiny local models and covariance files for the mergekit tests (no hub access)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import yaml
from tiny_models import tiny_bert_config, tiny_llama_config  # noqa: F401  (re-exported to the tests)

from pave_plugins.io.covariance import CovarianceMetadata, save_covariances

MERGEKIT_YAML = str(Path(sys.executable).with_name("mergekit-yaml"))


def build_family(kind: str, root: Path, n_models: int = 2, scale: float = 0.02, seed: int = 0) -> tuple[Path, list[Path]]:
    """Save a random base model and ``n_models`` fine-tunes (base + small random deltas)."""
    from transformers import BertForSequenceClassification, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        base = LlamaForCausalLM(tiny_llama_config())
    elif kind == "bert":
        # BertForSequenceClassification: mergekit 0.1.5's plain "bert" architecture (BertModel) fails
        # in its planner (optional weight with aliases: list + tuple TypeError), for every method
        base = BertForSequenceClassification(tiny_bert_config())
    else:
        raise ValueError(kind)
    base = base.float().eval()
    base_dir = root / f"{kind}_base"
    base.save_pretrained(base_dir, safe_serialization=True)
    ft_dirs = []
    for i in range(n_models):
        g = torch.Generator().manual_seed(seed * 100 + i + 1)
        ft = type(base)(base.config)
        ft.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g) * (1 + p.abs().mean()))
        d = root / f"{kind}_ft{i}"
        ft.save_pretrained(d, safe_serialization=True)
        ft_dirs.append(d)
    return base_dir, ft_dirs


def shared_input_groups(model_dir: Path) -> dict[str, list[str]]:
    """Linear layer names grouped by the input they read (q/k/v and gate/up share one)."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        names = [k[: -len(".weight")] for k in f.keys() if k.endswith(".weight") and f.get_slice(k).get_shape().__len__() == 2]
    groups: dict[str, list[str]] = {}
    for layer in names:
        leaf = layer.rsplit(".", 1)[-1]
        parent = layer.rsplit(".", 1)[0]
        if any(s in layer for s in ("embed", "lm_head", "pooler", "classifier")):
            continue
        if leaf in ("q_proj", "k_proj", "v_proj"):
            key = parent + ".qkv"
        elif leaf in ("gate_proj", "up_proj"):
            key = parent + ".gate_up"
        elif leaf in ("query", "key", "value"):
            key = parent + ".qkv"
        else:
            key = layer
        groups.setdefault(key, []).append(layer)
    return groups


def write_covariances(
    model_dir: Path, path: Path, seed: int, tokens_factor: int = 3, strip_prefix: str = ""
) -> Path:
    """Covariance file for ``model_dir`` from random anisotropic activations (tokens > features).

    Layer names are module names; ``strip_prefix`` removes a model prefix (as a covariance
    collected on the bare encoder would have them).
    """
    from safetensors import safe_open

    groups = shared_input_groups(model_dir)
    g = torch.Generator().manual_seed(seed)
    covs, layer_map = {}, {}
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        for i, (key, layers) in enumerate(sorted(groups.items())):
            n_in = f.get_slice(layers[0] + ".weight").get_shape()[1]
            scales = torch.logspace(0, -2, n_in, dtype=torch.float64)
            x = torch.randn(tokens_factor * n_in, n_in, generator=g, dtype=torch.float64) * scales
            covs[f"cov.{i}"] = x.T @ x
            for lay in layers:
                name = lay[len(strip_prefix):] if strip_prefix and lay.startswith(strip_prefix) else lay
                layer_map[name] = f"cov.{i}"
    save_covariances(path, covs, CovarianceMetadata(layer_map=layer_map, model_path=str(model_dir), n_tokens=1))
    return path


def run_mergekit_yaml(config: str, out: Path, *extra: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    cfg = out.parent / (out.name + ".yaml")
    cfg.write_text(config)
    return subprocess.run(
        [MERGEKIT_YAML, str(cfg), str(out), "--no-copy-tokenizer", *extra],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def load_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def clashing_method():
    """A plugin entry point that returns a new method named like one of mergekit's own."""
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.easy_define import merge_method

    def kernel(group: TensorGroup) -> torch.Tensor:
        return group.entries[0].tensor

    kernel.__annotations__ = {"group": TensorGroup, "return": torch.Tensor}
    return merge_method(kernel, name="linear")


def run_inprocess(config: str, out: Path, seed: int | None = None) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    cfg = MergeConfiguration.model_validate(yaml.safe_load(config))
    run_merge(
        cfg, str(out), options=MergeOptions(copy_tokenizer=False, quiet=True, random_seed=seed), config_source=config
    )
    return out

"""Tiny models and model pools for the FusionBench adapter tests (built in code, no hub)."""

from __future__ import annotations

import copy
import zlib

import torch
from torch import nn

IN, HID, OUT = 12, 16, 6


class TinyNet(nn.Module):
    """Two linear layers, a LayerNorm and an embedding-like 2-D parameter (not a Linear)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(IN, HID)
        self.norm = nn.LayerNorm(HID)
        self.fc2 = nn.Linear(HID, OUT)
        self.table = nn.Parameter(torch.randn(5, 4))

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def tiny_models(num_tasks: int = 3, seed: int = 0, scale: float = 0.05):
    """Pretrained TinyNet and ``num_tasks`` fine-tunes (random low-ish rank + noise updates)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = TinyNet()
    fts = {}
    for t in range(num_tasks):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                if p.ndim == 2:
                    a = torch.randn(p.shape[0], 3, generator=g)
                    b = torch.randn(3, p.shape[1], generator=g)
                    p.add_(scale * (a @ b) / 3 + 0.2 * scale * torch.randn(p.shape, generator=g))
                else:
                    p.add_(scale * torch.randn(p.shape, generator=g))
        fts[f"task{t}"] = m
    return base, fts


def pool_dict(base, fts, copy_models: bool = True):
    d = {"_pretrained_": copy.deepcopy(base) if copy_models else base}
    for k, v in fts.items():
        d[k] = copy.deepcopy(v) if copy_models else v
    return d


def inputs_for(name: str, n: int = 64, seed: int = 0, dim: int = IN) -> torch.Tensor:
    """Task inputs with a task-specific anisotropic spectrum (so covariances differ per task)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) % 1000 + seed)  # hash() varies per process
    scales = torch.logspace(0, -2, dim)[torch.randperm(dim, generator=g)]
    return torch.randn(n, dim, generator=g) * scales


def covariances_of(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Independent X^T X at the input of each nn.Linear (captured with plain hooks, float64)."""
    covs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            def hook(_m, args, _out, name=name):
                a = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                covs[name] = covs.get(name, 0) + a.T @ a
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return covs


def save_covariance_file(path, covs: dict[str, torch.Tensor]):
    from pave_plugins.io.covariance import CovarianceMetadata, save_covariances

    keys = {name: f"cov.{i}" for i, name in enumerate(sorted(covs))}
    save_covariances(path, {keys[n]: c for n, c in covs.items()}, CovarianceMetadata(layer_map=keys))
    return str(path)


def load_tiny(path: str) -> nn.Module:
    """Model-pool loader used through ``_target_`` (a pool that instantiates models on load)."""
    m = TinyNet()
    m.load_state_dict(torch.load(path, weights_only=True))
    return m


def task_dataset(name: str, n: int = 40):
    """Per-task inputs as a dataset (used as a model pool's train dataset)."""
    return torch.utils.data.TensorDataset(inputs_for(name, n))


class OutputMatchTaskPool:
    """A task pool scoring a model per task by -MSE to the individual fine-tuned model's outputs."""

    def __init__(self, fts):
        self.fts = fts
        self.calls = 0

    def evaluate(self, model):
        self.calls += 1
        rep = {}
        with torch.no_grad():
            for n, ft in self.fts.items():
                x = inputs_for(n, 32, seed=7)
                rep[n] = {"accuracy": -float(((model(x) - ft(x)) ** 2).mean())}
        return rep


def hand_purified_pool(base, fts, covs, rho, target="weight", method="spectral"):
    """Purified pool built independently: eq. 5 with an explicit inverse, literal Algorithm 1."""
    from fusion_bench import BaseModelPool

    from independent_reference import purified_weights

    names = list(fts)
    out = {n: copy.deepcopy(m) for n, m in fts.items()}
    for layer in ("fc1", "fc2"):
        w0 = getattr(base, layer).weight.detach()
        w_fts = [getattr(fts[n], layer).weight.detach() for n in names]
        purified = purified_weights(w0, w_fts, [covs[n][layer] for n in names], rho, target, method)
        for n, w in zip(names, purified):
            getattr(out[n], layer).weight.data.copy_(w.to(w0.dtype))
    return BaseModelPool(pool_dict(base, out))

"""A small built-in example: tiny Llama models fine-tuned on toy tasks, purified and merged.

Everything is built locally (no hub): a random tiny Llama base, K fine-tunes on K synthetic
next-token tasks ("next token = token + step_k mod V"), per-task input covariances of every
linear layer collected on the fine-tuned models, then Task Arithmetic, PAVE + Task Arithmetic
(Algorithm 1 ranks) and TSV-M, each evaluated by next-token accuracy on every task.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .core.purify import co_svd, prepare_covariance, purify_from_cosvd
from .core.rank_allocation import allocate_ranks
from .core.tsv import mean_task_vector, tsv_merge

logger = logging.getLogger(__name__)

VOCAB = 48
SEQ = 12


@dataclass
class DemoResult:
    accuracy: dict[str, list[float]]  # method -> per-task accuracy
    model_ratios: list[float]
    ranks: dict[str, list[int]]
    full_ranks: dict[str, int]
    relative_change: float
    seconds: float


def tiny_llama(seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def task_batch(step: int, n: int, generator: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, VOCAB, (n, 1), generator=generator)
    return (start + step * torch.arange(SEQ)) % VOCAB


def accuracy(model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    return float((logits.argmax(-1) == ids[:, 1:]).float().mean())


def fine_tune(model: nn.Module, step: int, steps: int, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        ids = task_batch(step, 32, g)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def linear_input_covariances(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``C = X^T X`` at the input of every ``nn.Linear`` (float64), one batch without padding."""
    covs: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):

            def hook(mod, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                covs[name] = covs.get(name, 0) + x.T @ x

            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return covs


def run_demo(
    workdir: str | Path | None = None,
    *,
    num_tasks: int = 3,
    steps: int = 60,
    rho: float = 15 / 16,
    lam: float = 1.0,
    seed: int = 0,
) -> DemoResult:
    """Build, fine-tune, purify and merge; optionally save the models under ``workdir``."""
    t0 = time.perf_counter()
    task_steps = [1 + 2 * k for k in range(num_tasks)]
    base = tiny_llama(seed)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    finetuned = []
    for k, st in enumerate(task_steps):
        model = tiny_llama(seed)
        fine_tune(model, st, steps, seed + 1 + k)
        finetuned.append(model)
        logger.info("fine-tuned task %d (step %d)", k, st)
    g = torch.Generator().manual_seed(seed + 100)
    test_ids = [task_batch(st, 64, g) for st in task_steps]
    calib_ids = [task_batch(st, 32, g) for st in task_steps]
    covs = [linear_input_covariances(m, ids) for m, ids in zip(finetuned, calib_ids)]
    ft_sds = [m.state_dict() for m in finetuned]

    # PAVE: one CO-SVD per layer per model, Algorithm 1 across models, eq. 6 in residual form
    layers = sorted(covs[0])
    prepared = [{n: prepare_covariance(c[n], name=n) for n in layers} for c in covs]
    decs = {n: [co_svd(ft[n + ".weight"], base_sd[n + ".weight"], p[n], name=n) for ft, p in zip(ft_sds, prepared)]
            for n in layers}
    alloc = allocate_ranks({n: [d.s for d in decs[n]] for n in layers}, rho)
    purified = [dict() for _ in finetuned]
    changes = []
    for n in layers:
        for i, d in enumerate(decs[n]):
            res = purify_from_cosvd(d, alloc.ranks[n][i], name=n)
            purified[i][n + ".weight"] = res.task_vector
            changes.append(res.relative_change)

    def merged_model(task_vector_for) -> nn.Module:
        model = tiny_llama(seed)
        sd = {}
        for key, w0 in base_sd.items():
            sd[key] = w0 + task_vector_for(key)
        model.load_state_dict(sd)
        return model

    def ta(key, vectors=None):
        vs = [(ft[key] - base_sd[key]) for ft in ft_sds] if vectors is None else vectors
        return lam * sum(vs)

    def pave_ta(key):
        return ta(key, [p.get(key, ft[key] - base_sd[key]) for p, ft in zip(purified, ft_sds)])

    def tsv(key):
        tvs = [ft[key] - base_sd[key] for ft in ft_sds]
        return tsv_merge(tvs) if tvs[0].ndim == 2 else mean_task_vector(tvs)

    models = {"base": base, **{f"fine-tune {k}": m for k, m in enumerate(finetuned)}}
    models["task arithmetic"] = merged_model(ta)
    models["PAVE + task arithmetic"] = merged_model(pave_ta)
    models["TSV-M"] = merged_model(tsv)
    acc = {name: [accuracy(m, ids) for ids in test_ids] for name, m in models.items()}
    if workdir is not None:
        workdir = Path(workdir)
        for name, m in models.items():
            m.save_pretrained(workdir / name.replace(" ", "_").replace("+", "plus"))
    return DemoResult(
        accuracy=acc,
        model_ratios=alloc.model_ratios,
        ranks=alloc.ranks,
        full_ranks=alloc.full_ranks,
        relative_change=sum(changes) / len(changes),
        seconds=time.perf_counter() - t0,
    )


def format_result(res: DemoResult) -> str:
    k = len(res.model_ratios)
    lines = ["", "Next-token accuracy per task (%):", f"{'model':<26}" + "".join(f"{'task ' + str(i):>9}" for i in range(k)) + f"{'mean':>9}"]
    for name, accs in res.accuracy.items():
        lines.append(f"{name:<26}" + "".join(f"{100 * a:9.1f}" for a in accs) + f"{100 * sum(accs) / k:9.1f}")
    lines += ["", "Spectral rank allocation (Algorithm 1), rank kept per model / full rank:"]
    for layer, ranks in list(res.ranks.items())[:6]:
        lines.append(f"  {layer:<40} {ranks} / {res.full_ranks[layer]}")
    if len(res.ranks) > 6:
        lines.append(f"  ... {len(res.ranks) - 6} more layers")
    lines.append("  per-model preserved rank ratio rho_i (line 15): " + ", ".join(f"{r:.4f}" for r in res.model_ratios))
    lines.append(f"  mean ||dW_PAVE - dW|| / ||dW|| over purified weights: {res.relative_change:.3f}")
    lines.append(f"done in {res.seconds:.1f} s")
    return "\n".join(lines)

"""Tasks, configuration, the frozen zero-shot encoder heads and (cached) fine-tuning of the benchmark.

Shared by :mod:`pave_plugins.bench.harness` (the run) and :mod:`pave_plugins.bench.lora_experts` (LoRA
experts and mergekit folders); imports neither.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")

# --------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """One classification task read from a data folder."""

    name: str
    labels: list[str]
    splits: dict[str, list[tuple[str, int]]]
    digest: str  # sha1 of the files, part of the fine-tune cache key

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def load_task(path: str | os.PathLike) -> Task:
    """Read ``labels.json`` and the three jsonl splits of a task folder."""
    path = Path(path)
    meta_file = path / "labels.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"task folder {path} has no labels.json")
    meta = json.loads(meta_file.read_text())
    labels = meta.get("labels")
    if not isinstance(labels, list) or len(labels) < 2:
        raise ValueError(f"{meta_file}: 'labels' must be a list of at least two label names")
    h = hashlib.sha1(meta_file.read_bytes())
    splits: dict[str, list[tuple[str, int]]] = {}
    for split in SPLITS:
        f = path / f"{split}.jsonl"
        if not f.is_file():
            raise FileNotFoundError(f"task folder {path} has no {split}.jsonl")
        raw = f.read_bytes()
        h.update(raw)
        rows = []
        for i, line in enumerate(raw.decode("utf-8").splitlines()):
            if not line.strip():
                continue
            r = json.loads(line)
            lab = int(r["label"])
            if not 0 <= lab < len(labels):
                raise ValueError(f"{f}:{i + 1}: label {lab} out of range 0..{len(labels) - 1}")
            rows.append((str(r["text"]), lab))
        if not rows:
            raise ValueError(f"{f} is empty")
        splits[split] = rows
    return Task(name=meta.get("task", path.name), labels=labels, splits=splits, digest=h.hexdigest())


# --------------------------------------------------------------------------- configuration


def default_cache_dir() -> str:
    """Fine-tunes and covariances are cached under the user's cache folder (``$XDG_CACHE_HOME``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "pave_plugins", "bench")


@dataclass
class BenchConfig:
    """Everything that defines a run (written into the JSON result)."""

    data_dir: str
    tasks: list[str]
    model_path: str
    out_dir: str
    cache_dir: str = field(default_factory=lambda: default_cache_dir())
    device: str = "cpu"  # fine-tuning, collection, merges and evaluation (cpu, cuda, cuda:N)
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 32
    max_length: int = 64
    scale: float = 20.0
    cov_examples: int = 512
    val_per_class: int | None = None  # None: the whole validation split
    test_per_class: int | None = None  # None: the whole test split
    eval_batch_size: int = 128
    threads: int | None = None
    methods: list[str] | None = None  # None: all
    ta_grid: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8, 1.0])
    ties_grid: list[float] = field(default_factory=lambda: [0.6, 1.0, 1.5, 2.0])
    ties_threshold: float = 20.0
    dare_grid: list[float] = field(default_factory=lambda: [0.4, 0.6, 0.8, 1.0])
    dare_sparsity: list[float] = field(default_factory=lambda: [0.5, 0.9])
    tsv_grid: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    rho_grid: list[float] = field(default_factory=lambda: [7 / 8, 15 / 16, 31 / 32])
    pave_targets: list[str] = field(default_factory=lambda: ["weight", "delta"])
    pave_allocations: list[str] = field(default_factory=lambda: ["spectral", "uniform"])
    pave_bases: list[str] = field(default_factory=lambda: ["ta", "ties", "dare", "emr", "tsvm"])
    damping_grid: list[float] = field(default_factory=lambda: [0.0])  # PAVE damping, chosen on validation with rho
    damping_rule: str = "relative"  # PAVE damping rule (PaveSettings.damping_rule)
    granularity_grid: list[str] = field(default_factory=lambda: ["layer"])  # PAVE rank_granularity, chosen likewise
    calib_per_task: int = 32  # LoRA-DV calibration samples per task
    rethink_iterations: int = 3  # LoRA-DV T
    rethink_epochs: int = 10
    rethink_lr: float = 5e-3
    lora_rank: int = 8  # LoRA experts (PEFT): rank r, alpha = 2r
    lora_lr: float = 1e-3
    mergekit_density: float = 0.2  # mergekit TIES trim (the FusionBench TIES threshold of 20 %)
    pave_host_final: list[str] | None = None  # PAVE+X finals through FusionBench pave/pave (None: every X)
    exclude_keys: list[str] = field(default_factory=lambda: ["embeddings.word_embeddings.weight"])
    # protocol: "zero-shot-heads" (frozen label-name heads, all task knowledge in the encoder) or
    # "trained-heads" (a linear head per task trained with the encoder, kept per task, never merged)
    protocol: str = "zero-shot-heads"
    schedule: str = "constant"  # or "linear": linear warm-up over warmup_ratio of the steps, then linear decay to 0
    warmup_ratio: float = 0.06
    train_embeddings: bool = False  # also fine-tune the word embeddings (frozen by default)
    head_lr: float | None = None  # trained heads' learning rate (None: 10 x lr)
    regmean_grid: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])  # reduce_non_diagonal_ratio
    extend_grids: int = 2  # extend a 1-D grid whose best value sits on its edge, at most this many times


# --------------------------------------------------------------------------- encoder utilities


def load_base(model_path: str):
    """Tokenizer and base encoder (``AutoModel``), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval()
    return tok, model


Batch = tuple[Tensor, Tensor, Tensor]  # input_ids, attention_mask, labels


def make_batches(tok, rows: Sequence[tuple[str, int]], batch_size: int, max_length: int, *, sort: bool = True,
                 device: str | torch.device = "cpu") -> list[Batch]:
    """Tokenise once, on ``device``; batches of similar length (sorted) for fast evaluation."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0])) if sort else list(range(len(rows)))
    out = []
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        enc = tok([rows[j][0] for j in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append((enc["input_ids"].to(device), enc["attention_mask"].to(device),
                    torch.tensor([rows[j][1] for j in idx], device=device)))
    return out


def mean_pool(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the last hidden states over the attention mask (sentence-transformers pooling)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    m = attention_mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1e-9)


@torch.no_grad()
def label_head(model: nn.Module, tok, labels: Sequence[str], max_length: int) -> Tensor:
    """Frozen zero-shot head: the base model's normalised embedding of each label name."""
    enc = tok(list(labels), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    dev = next(model.parameters()).device
    return F.normalize(mean_pool(model.eval(), enc["input_ids"].to(dev), enc["attention_mask"].to(dev)), dim=-1)


Head = Tensor | dict[str, Tensor]  # zero-shot label embeddings, or a trained linear head {"weight", "bias"}


def logits(model: nn.Module, head: Head, input_ids: Tensor, attention_mask: Tensor, scale: float) -> Tensor:
    """Zero-shot head (a tensor of label embeddings): ``scale * cos(pooled, label)``; trained head (a
    dict): ``pooled @ weight^T + bias``."""
    pooled = mean_pool(model, input_ids, attention_mask)
    if isinstance(head, dict):
        return F.linear(pooled, head["weight"], head["bias"])
    return scale * F.normalize(pooled, dim=-1) @ head.T


@torch.inference_mode()
def predictions(model: nn.Module, head: Head, batches: Iterable[Batch], scale: float) -> Tensor:
    """Per-example correctness (bool, in batch order) of ``model`` with ``head``."""
    model.eval()
    out = [logits(model, head, ids, mask, scale).argmax(-1) == y for ids, mask, y in batches]
    return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.bool)


@torch.inference_mode()
def accuracy(model: nn.Module, head: Head, batches: Iterable[Batch], scale: float) -> float:
    model.eval()
    correct = total = 0
    for ids, mask, y in batches:
        pred = logits(model, head, ids, mask, scale).argmax(-1)
        correct += int((pred == y).sum())
        total += int(y.numel())
    return 100.0 * correct / max(total, 1)


# --------------------------------------------------------------------------- fine-tuning (cached)


def _model_fingerprint(model_path: str) -> str:
    p = Path(model_path)
    files = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")) + sorted(p.glob("config.json"))
    return hashlib.sha1(json.dumps([(f.name, f.stat().st_size) for f in files]).encode()).hexdigest()[:12]


def finetune_key(cfg: BenchConfig, task: Task, seed: int, kind: str = "full") -> str:
    spec = {"model": _model_fingerprint(cfg.model_path), "task": task.name, "data": task.digest, "steps": cfg.steps,
            "lr": cfg.lr, "bs": cfg.batch_size, "len": cfg.max_length, "scale": cfg.scale, "seed": seed, "kind": kind}
    # options that change the fine-tune enter the key only when not at their default (older keys unchanged)
    for name, default in (("protocol", "zero-shot-heads"), ("schedule", "constant"), ("train_embeddings", False)):
        if getattr(cfg, name) != default:
            spec[name] = getattr(cfg, name)
    if cfg.schedule != "constant":
        spec["warmup_ratio"] = cfg.warmup_ratio
    if cfg.protocol != "zero-shot-heads":
        spec["head_lr"] = head_lr(cfg)
    if torch.device(cfg.device).type != "cpu":  # trained elsewhere, rounded differently (CPU keys unchanged)
        spec["device"] = torch.device(cfg.device).type
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def head_lr(cfg: BenchConfig) -> float:
    return 10.0 * cfg.lr if cfg.head_lr is None else cfg.head_lr


def lr_lambda(cfg: BenchConfig) -> Callable[[int], float]:
    """Multiplier of the learning rate at a step: 1 (``constant``), or linear warm-up over
    ``warmup_ratio`` of the steps then linear decay to 0 (``linear``, as in the GLUE fine-tunes)."""
    if cfg.schedule == "constant":
        return lambda step: 1.0
    if cfg.schedule != "linear":
        raise ValueError(f"unknown schedule {cfg.schedule!r} (constant, linear)")
    warm = max(1, int(round(cfg.warmup_ratio * cfg.steps)))
    return lambda step: (step + 1) / warm if step < warm else max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))


def train_steps(encoder: nn.Module, params: Sequence[nn.Parameter], tok, task: Task, head: Head, cfg: BenchConfig,
                seed: int, lr: float, head_params: Sequence[nn.Parameter] = ()) -> float:
    """``cfg.steps`` AdamW steps of cross-entropy through ``head`` (shared by the full fine-tunes and
    the LoRA experts; ``head_params``: a trained head's parameters, at :func:`head_lr`), with the
    schedule of ``cfg.schedule``; returns the seconds taken."""
    encoder.train()
    dev = next(encoder.parameters()).device
    groups = [{"params": list(params), "lr": lr}]
    if head_params:
        groups.append({"params": list(head_params), "lr": head_lr(cfg)})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    rows = task.splits["train"]
    g = torch.Generator().manual_seed(seed)
    perm: list[int] = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        if len(perm) < cfg.batch_size:
            perm += torch.randperm(len(rows), generator=g).tolist()
        idx, perm = perm[:cfg.batch_size], perm[cfg.batch_size:]
        enc = tok([rows[i][0] for i in idx], padding=True, truncation=True, max_length=cfg.max_length,
                  return_tensors="pt").to(dev)
        y = torch.tensor([rows[i][1] for i in idx], device=dev)
        loss = F.cross_entropy(logits(encoder, head, enc["input_ids"], enc["attention_mask"], cfg.scale), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == cfg.steps - 1:
            log.info("  %s seed %d step %d/%d loss %.3f", task.name, seed, step + 1, cfg.steps, float(loss.detach()))
    encoder.eval()
    return time.perf_counter() - t0


def finetune(base: nn.Module, tok, task: Task, head: Tensor, cfg: BenchConfig, seed: int
             ) -> tuple[dict[str, Tensor], Head]:
    """Full fine-tuning, cached on disk; returns the encoder's state dict and the task's head.

    ``zero-shot-heads``: the frozen label-name head ``head`` (returned as is), word embeddings frozen
    unless ``cfg.train_embeddings``. ``trained-heads``: a linear head (seeded random init, as a
    classification head of the GLUE fine-tunes) trained with the encoder and stored with it.
    """
    from safetensors.torch import load_file, save_file

    from pave_plugins.io.output import output_file

    key = finetune_key(cfg, task, seed)
    path = Path(cfg.cache_dir) / "finetunes" / f"{task.name}-s{seed}-{key}.safetensors"
    if path.is_file():
        log.info("fine-tune of %s (seed %d) from cache %s", task.name, seed, path)
        return _split_head(load_file(str(path), device=str(cfg.device)), head)
    torch.manual_seed(seed)
    model = copy.deepcopy(base).to(cfg.device)
    for n, p in model.named_parameters():
        p.requires_grad_(cfg.train_embeddings or "word_embeddings" not in n)
    head_params: list[nn.Parameter] = []
    if cfg.protocol == "trained-heads":
        lin = nn.Linear(base.config.hidden_size, task.num_classes).to(cfg.device)
        head_params = list(lin.parameters())
        head = {"weight": lin.weight, "bias": lin.bias}
    elif cfg.protocol != "zero-shot-heads":
        raise ValueError(f"unknown protocol {cfg.protocol!r} (zero-shot-heads, trained-heads)")
    seconds = train_steps(model, [p for p in model.parameters() if p.requires_grad], tok, task, head, cfg, seed, cfg.lr,
                          head_params)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if isinstance(head, dict):
        head = {k: v.detach().clone() for k, v in head.items()}
        sd.update({f"{HEAD_PREFIX}{k}": v for k, v in head.items()})
    with output_file(path, who="pave bench cache", flag="cache entry") as tmp:
        save_file({k: v.cpu() for k, v in sd.items()}, str(tmp), metadata={"task": task.name, "seed": str(seed), "seconds": f"{seconds:.1f}"})
    log.info("fine-tuned %s (seed %d) in %.1f s -> %s", task.name, seed, seconds, path)
    return _split_head(sd, head)


HEAD_PREFIX = "__task_head__."


def _split_head(sd: dict[str, Tensor], head: Head) -> tuple[dict[str, Tensor], Head]:
    """The encoder's state dict and the head (the trained one stored with it, else ``head``)."""
    stored = {k[len(HEAD_PREFIX):]: v for k, v in sd.items() if k.startswith(HEAD_PREFIX)}
    enc = {k: v for k, v in sd.items() if not k.startswith(HEAD_PREFIX)}
    return enc, (stored or head)


def task_vector_ratio(base_sd: dict[str, Tensor], ft_sd: dict[str, Tensor]) -> dict[str, float]:
    """``||tau|| / ||W||`` of a fine-tune over all encoder parameters and over the 2-D linear
    weights only (embeddings excluded), Frobenius norms in float64."""
    out = {}
    for name, keep in (("all", lambda k, v: True),
                       ("linear", lambda k, v: v.ndim == 2 and "embeddings" not in k)):
        num = den = 0.0
        for k, w in base_sd.items():
            if not w.is_floating_point() or not keep(k, w):
                continue
            num += float((ft_sd[k].double() - w.double()).pow(2).sum())
            den += float(w.double().pow(2).sum())
        out[name] = math.sqrt(num / den) if den > 0 else 0.0
    return out

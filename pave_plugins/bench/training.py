"""Tasks, configuration, the frozen zero-shot encoder heads and (cached) fine-tuning of the benchmark.

Shared by :mod:`pave_plugins.bench.harness` (the run) and :mod:`pave_plugins.bench.hosts` (LoRA
experts and mergekit folders); imports neither.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

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
    calib_per_task: int = 32  # LoRA-DV calibration samples per task
    rethink_iterations: int = 3  # LoRA-DV T
    rethink_epochs: int = 10
    rethink_lr: float = 5e-3
    lora_rank: int = 8  # LoRA experts (PEFT): rank r, alpha = 2r
    lora_lr: float = 1e-3
    mergekit_density: float = 0.2  # mergekit TIES trim (the FusionBench TIES threshold of 20 %)
    pave_host_final: list[str] | None = None  # PAVE+X finals through FusionBench pave/pave (None: every X)
    exclude_keys: list[str] = field(default_factory=lambda: ["embeddings.word_embeddings.weight"])


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


def logits(model: nn.Module, head: Tensor, input_ids: Tensor, attention_mask: Tensor, scale: float) -> Tensor:
    return scale * F.normalize(mean_pool(model, input_ids, attention_mask), dim=-1) @ head.T


@torch.inference_mode()
def accuracy(model: nn.Module, head: Tensor, batches: Iterable[Batch], scale: float) -> float:
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
    if torch.device(cfg.device).type != "cpu":  # trained elsewhere, rounded differently (CPU keys unchanged)
        spec["device"] = torch.device(cfg.device).type
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def train_steps(encoder: nn.Module, params: Sequence[nn.Parameter], tok, task: Task, head: Tensor, cfg: BenchConfig,
                seed: int, lr: float) -> float:
    """``cfg.steps`` AdamW steps of cross-entropy through the frozen zero-shot head (shared by the
    full fine-tunes and the LoRA experts); returns the seconds taken."""
    encoder.train()
    dev = next(encoder.parameters()).device
    opt = torch.optim.AdamW(list(params), lr=lr, weight_decay=0.0)
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
        if step % 25 == 0 or step == cfg.steps - 1:
            log.info("  %s seed %d step %d/%d loss %.3f", task.name, seed, step + 1, cfg.steps, float(loss.detach()))
    encoder.eval()
    return time.perf_counter() - t0


def finetune(base: nn.Module, tok, task: Task, head: Tensor, cfg: BenchConfig, seed: int) -> dict[str, Tensor]:
    """Full fine-tuning with frozen word embeddings and the frozen zero-shot head; cached on disk."""
    from safetensors.torch import load_file, save_file

    from pave_plugins.io.atomic import atomic_path

    key = finetune_key(cfg, task, seed)
    path = Path(cfg.cache_dir) / "finetunes" / f"{task.name}-s{seed}-{key}.safetensors"
    if path.is_file():
        log.info("fine-tune of %s (seed %d) from cache %s", task.name, seed, path)
        return load_file(str(path), device=str(cfg.device))
    torch.manual_seed(seed)
    model = copy.deepcopy(base).to(cfg.device)
    for n, p in model.named_parameters():
        p.requires_grad_("word_embeddings" not in n)
    seconds = train_steps(model, [p for p in model.parameters() if p.requires_grad], tok, task, head, cfg, seed, cfg.lr)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.cpu() for k, v in sd.items()}, str(tmp), metadata={"task": task.name, "seed": str(seed), "seconds": f"{seconds:.1f}"})
    log.info("fine-tuned %s (seed %d) in %.1f s -> %s", task.name, seed, seconds, path)
    return sd

"""The real offline benchmark harness (issue 8).

Pipeline, per seed:

1. **Tasks as data**: every task is a folder with ``labels.json`` (``{"labels": [names...]}``) and
   ``train/validation/test.jsonl`` (``{"text": ..., "label": int}``), see
   ``benchmarks/real/build_data.py``.
2. **Frozen zero-shot heads**: each label name is embedded by the *base* encoder (mean pooling
   over the attention mask); logits = ``scale * cos(pooled, label)``. All task knowledge then
   lives in the task vector, as with CLIP heads in the TSV / EMR literature.
3. **Fine-tunes** (cached on disk, outside git): full fine-tuning with frozen word embeddings.
4. **Covariances** ``C = sum_t x_t x_t^T`` at the input of every linear layer of each fine-tuned
   model (PAVE eq. 5), padding excluded, float64.
5. **Merges** through the hosts' code paths (FusionBench algorithms on an in-memory
   ``BaseModelPool``; ours for TSV-M), PAVE purification (eq. 6, ``target="weight"``, or the
   task-vector variant ``target="delta"``) with spectral (Algorithm 1) or uniform rank
   allocation applied to every fine-tune before the merge.
6. **Selection on validation only**: every hyper-parameter (lambda, density, alpha, rho) is
   picked by the mean validation accuracy over tasks; the test split is read once per method.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

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


@dataclass
class BenchConfig:
    """Everything that defines a run (written into the JSON result)."""

    data_dir: str
    tasks: list[str]
    model_path: str
    out_dir: str
    cache_dir: str = "/work/bench_cache"
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


def make_batches(tok, rows: Sequence[tuple[str, int]], batch_size: int, max_length: int, *, sort: bool = True) -> list[Batch]:
    """Tokenise once; batches of similar length (sorted) for fast evaluation."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0])) if sort else list(range(len(rows)))
    out = []
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        enc = tok([rows[j][0] for j in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append((enc["input_ids"], enc["attention_mask"], torch.tensor([rows[j][1] for j in idx])))
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
    return F.normalize(mean_pool(model.eval(), enc["input_ids"], enc["attention_mask"]), dim=-1)


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
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def train_steps(encoder: nn.Module, params: Sequence[nn.Parameter], tok, task: Task, head: Tensor, cfg: BenchConfig,
                seed: int, lr: float) -> float:
    """``cfg.steps`` AdamW steps of cross-entropy through the frozen zero-shot head (shared by the
    full fine-tunes and the LoRA experts); returns the seconds taken."""
    encoder.train()
    opt = torch.optim.AdamW(list(params), lr=lr, weight_decay=0.0)
    rows = task.splits["train"]
    g = torch.Generator().manual_seed(seed)
    perm: list[int] = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        if len(perm) < cfg.batch_size:
            perm += torch.randperm(len(rows), generator=g).tolist()
        idx, perm = perm[:cfg.batch_size], perm[cfg.batch_size:]
        enc = tok([rows[i][0] for i in idx], padding=True, truncation=True, max_length=cfg.max_length, return_tensors="pt")
        y = torch.tensor([rows[i][1] for i in idx])
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
        return load_file(str(path))
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    for n, p in model.named_parameters():
        p.requires_grad_("word_embeddings" not in n)
    seconds = train_steps(model, [p for p in model.parameters() if p.requires_grad], tok, task, head, cfg, seed, cfg.lr)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata={"task": task.name, "seed": str(seed), "seconds": f"{seconds:.1f}"})
    log.info("fine-tuned %s (seed %d) in %.1f s -> %s", task.name, seed, seconds, path)
    return sd


# --------------------------------------------------------------------------- covariances


def linear_weight_names(model: nn.Module) -> dict[str, str]:
    """``module name -> weight key`` of every ``nn.Linear`` (the layers PAVE purifies)."""
    return {n: f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def task_covariances(model: nn.Module, tok, task: Task, cfg: BenchConfig):
    """``cfg.cov_examples`` training examples of the task fed to its fine-tuned model, collected
    with :func:`pave_plugins.collect.collect_covariances`."""
    from pave_plugins.collect import collect_covariances as package_collect

    rows = task.splits["train"][: cfg.cov_examples]
    batches = make_batches(tok, rows, cfg.eval_batch_size, cfg.max_length, sort=False)
    inputs = [{"input_ids": ids, "attention_mask": mask} for ids, mask, _ in batches]
    return package_collect(model, inputs, progress=False)


# --------------------------------------------------------------------------- PAVE purification of a pool


@dataclass
class PaveCache:
    """The one CO-SVD per (model, layer, target), with the dense operands stripped to save memory."""

    cosvd: dict[tuple[int, str, str], Any] = field(default_factory=dict)


def pave_purify_pool(base_sd: dict[str, Tensor], ft_sds: Sequence[dict[str, Tensor]], covs: Sequence[dict[str, Tensor]],
                     layers: dict[str, str], *, target: str, allocation: str, rho: float,
                     cache: PaveCache) -> tuple[list[dict[str, Tensor]], dict[str, float]]:
    """Purified fine-tunes ``theta_pre + dW_PAVE`` (eq. 6) with ranks from Algorithm 1 / uniform.

    Parameters without a covariance keep the plain task vector. Returns the purified state dicts
    and statistics (mean ``||dW_PAVE - dW|| / ||dW||`` over layers and models, rank ratios).
    """
    from pave_plugins.core import co_svd, model_rank_ratios, prepare_covariance
    from pave_plugins.core.layer import purify_layer_from_cosvds

    svals: dict[str, list[Tensor]] = {}
    for mod, wkey in layers.items():
        if any(mod not in c for c in covs):
            # no covariance for this layer (every Linear is collected, so this is a layer no token
            # reached): plain task vectors, said in the log
            log.warning("PAVE: no covariance for %s in model(s) %s: plain task vectors for this layer", mod,
                        [k for k, c in enumerate(covs) if mod not in c])
            continue
        row = []
        for k, sd in enumerate(ft_sds):
            ck = (k, wkey, target)
            if ck not in cache.cosvd:
                prep = prepare_covariance(covs[k].get(mod), name=f"covariance of {mod} (model {k})")
                d = co_svd(sd[wkey], base_sd[wkey], prep, target=target, name=wkey)
                cache.cosvd[ck] = dataclasses.replace(d, delta=None, w_ft=None)
            row.append(cache.cosvd[ck].s)
        svals[wkey] = row
    out = [dict(sd) for sd in ft_sds]
    rel_by_model: list[list[float]] = [[] for _ in ft_sds]
    ranks: dict[str, list[int]] = {}
    full_ranks: dict[str, int] = {}
    met: dict[str, bool] = {}
    for wkey in svals:  # ranks (Algorithm 1 / uniform) and dW_PAVE (eq. 6) per layer: core.layer
        b64 = base_sd[wkey].to(torch.float64)
        decs = []
        for k, sd in enumerate(ft_sds):
            ft64 = sd[wkey].to(torch.float64)
            decs.append(dataclasses.replace(cache.cosvd[(k, wkey, target)], w_ft=ft64, delta=ft64 - b64))
        lp = purify_layer_from_cosvds(decs, rho=rho, allocation=allocation, names=[wkey] * len(decs), name=wkey,
                                      release=True)
        ranks[wkey], full_ranks[wkey], met[wkey] = lp.ranks, lp.full_rank, lp.budget_met
        for k, p in enumerate(lp.purifications):
            out[k][wkey] = (b64 + p.task_vector.to(torch.float64)).to(ft_sds[k][wkey].dtype)
            if math.isfinite(p.relative_change):
                rel_by_model[k].append(p.relative_change)
    rel = [r for rs in rel_by_model for r in rs]  # model-major order, as the statistics always used
    stats = {"mean_rel_change": float(sum(rel) / max(len(rel), 1)), "max_rel_change": float(max(rel, default=0.0)),
             "model_rank_ratios": [float(r) for r in model_rank_ratios(ranks, full_ranks)],
             "budget_met": bool(all(met.values()))}
    return out, stats


# --------------------------------------------------------------------------- merge methods (host code paths)

Provider = Callable[[str], nn.Module]  # task name -> model to evaluate on it


def _module(base: nn.Module, sd: dict[str, Tensor]) -> nn.Module:
    m = copy.deepcopy(base)
    m.load_state_dict(sd)
    return m.eval()


def _pool(base: nn.Module, base_sd: dict[str, Tensor], sds: Sequence[dict[str, Tensor]], names: Sequence[str]):
    from fusion_bench import BaseModelPool

    models = {"_pretrained_": _module(base, base_sd)}
    for n, sd in zip(names, sds):
        models[n] = _module(base, sd)
    return BaseModelPool(models)


def run_method(kind: str, hp: dict[str, Any], base: nn.Module, base_sd, sds, names, cfg: BenchConfig, seed: int) -> Provider:
    """Merge ``sds`` (fine-tuned or purified state dicts) with host method ``kind`` and ``hp``."""
    pool = _pool(base, base_sd, sds, names)
    if kind == "average":
        from fusion_bench.method import SimpleAverageAlgorithm

        merged = SimpleAverageAlgorithm().run(pool)
    elif kind == "ta":
        from fusion_bench.method import TaskArithmeticAlgorithm

        merged = TaskArithmeticAlgorithm(scaling_factor=hp["lambda"]).run(pool)
    elif kind == "ties":
        from fusion_bench.method import TiesMergingAlgorithm

        merged = TiesMergingAlgorithm(scaling_factor=hp["lambda"], threshold=cfg.ties_threshold,
                                      remove_keys=[], merge_func="sum").run(pool)
    elif kind == "dare":
        from fusion_bench.method.dare import DareTaskArithmetic

        torch.manual_seed(seed)
        merged = DareTaskArithmetic(scaling_factor=hp["lambda"], sparsity_ratio=hp["sparsity"],
                                    only_on_linear_weights=False, rescale=True).run(pool)
    elif kind == "emr":
        from fusion_bench.method.emr_merging.emr_merging import EMRMerging

        emr = EMRMerging().run(pool)

        def provider(task: str) -> nn.Module:
            emr.set_task(task)
            return emr

        return provider
    elif kind == "tsvm_fb":
        from fusion_bench.method.task_singular_vector.TSVM import TaskSingularVectorMerging

        merged = TaskSingularVectorMerging(alpha=hp["alpha"], exclude_keys=list(cfg.exclude_keys)).run(pool)
    elif kind == "tsvm":
        from pave_plugins.fusion_bench.tsv import TSVMerging

        merged = TSVMerging(alpha=hp["alpha"], exclude_keys=list(cfg.exclude_keys), write_model_card=False).run(pool)
    else:
        raise ValueError(f"unknown merge method {kind!r}")
    merged = merged.eval()
    return lambda task: merged


class _CorePath(Exception):
    pass


def run_pave_host(kind: str, hp: dict[str, Any], target: str, allocation: str, rho: float, base: nn.Module,
                  base_sd, sds, covs: str, names, cfg: BenchConfig, seed: int) -> Provider:
    """PAVE + ``kind`` through FusionBench's ``pave/pave`` algorithm of this package.

    ``covs``: folder of covariance files ``<task>.safetensors`` (as written by ``pave collect``)."""
    from pave_plugins.fusion_bench.pave import PAVEAlgorithm

    inner = {"ta": {"name": "task_arithmetic", "scaling_factor": hp.get("lambda")},
             "ties": {"name": "ties_merging", "scaling_factor": hp.get("lambda"), "threshold": cfg.ties_threshold,
                      "remove_keys": [], "merge_func": "sum"},
             "dare": {"name": "dare/task_arithmetic", "scaling_factor": hp.get("lambda"),
                      "sparsity_ratio": hp.get("sparsity"), "only_on_linear_weights": False, "rescale": True},
             "emr": {"name": "emr_merging/emr_merging"},
             "tsvm": {"name": "pave/tsv_m", "alpha": hp.get("alpha"), "exclude_keys": list(cfg.exclude_keys)}}[kind]
    algo = PAVEAlgorithm(inner=inner, rho=rho, rank_allocation=allocation, target=target,
                         covariances=covs, write_model_card=False)
    torch.manual_seed(seed)
    merged = algo.run(_pool(base, base_sd, sds, names))
    if hasattr(merged, "set_task"):
        def provider(task: str) -> nn.Module:
            merged.set_task(task)
            return merged

        return provider
    merged = merged.eval()
    return lambda task: merged


def method_grid(kind: str, cfg: BenchConfig) -> list[dict[str, Any]]:
    if kind == "ta":
        return [{"lambda": v} for v in cfg.ta_grid]
    if kind == "ties":
        return [{"lambda": v} for v in cfg.ties_grid]
    if kind == "dare":
        return [{"lambda": v, "sparsity": s} for s in cfg.dare_sparsity for v in cfg.dare_grid]
    if kind in ("tsvm", "tsvm_fb"):
        return [{"alpha": v} for v in cfg.tsv_grid]
    return [{}]


BASE_METHODS = {"average": "simple average", "ta": "Task Arithmetic", "ties": "TIES", "dare": "DARE (TA)",
                "emr": "EMR", "tsvm_fb": "TSV-M (FusionBench)", "tsvm": "TSV-M (ours)"}


# --------------------------------------------------------------------------- the run


def _threads(cfg: BenchConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)


def _subsample(rows, per_class: int | None, num_classes: int):
    if per_class is None:
        return rows
    count = [0] * num_classes
    out = []
    for r in rows:
        if count[r[1]] < per_class:
            count[r[1]] += 1
            out.append(r)
    return out


def run_seed(cfg: BenchConfig, seed: int, tasks: list[Task], tok, base: nn.Module) -> dict[str, Any]:
    """Fine-tune, collect, merge with every method, select on validation, evaluate on test."""
    t_seed = time.perf_counter()
    names = [t.name for t in tasks]
    heads = {t.name: label_head(base, tok, t.labels, cfg.max_length) for t in tasks}
    val = {t.name: make_batches(tok, _subsample(t.splits["validation"], cfg.val_per_class, t.num_classes),
                                cfg.eval_batch_size, cfg.max_length) for t in tasks}
    test = {t.name: make_batches(tok, _subsample(t.splits["test"], cfg.test_per_class, t.num_classes),
                                 cfg.eval_batch_size, cfg.max_length) for t in tasks}
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    ft_sds = [finetune(base, tok, t, heads[t.name], cfg, seed) for t in tasks]
    timings["finetune_or_load_s"] = time.perf_counter() - t0

    def evaluate(provider: Provider, batches) -> dict[str, float]:
        return {n: accuracy(provider(n), heads[n], batches[n], cfg.scale) for n in names}

    results: dict[str, Any] = {}
    wanted = (lambda m: True) if not cfg.methods else (lambda m: any(m == w or m.startswith(w) for w in cfg.methods))

    def record(key: str, label: str, provider: Provider, hp: dict, val_acc: dict | None, merge_s: float, extra=None):
        t1 = time.perf_counter()
        te = evaluate(provider, test)
        results[key] = {"label": label, "hp": hp, "val": val_acc, "test": te,
                        "test_avg": sum(te.values()) / len(te), "merge_s": merge_s,
                        "test_eval_s": time.perf_counter() - t1, **(extra or {})}
        log.info("seed %d %-34s test avg %.2f  %s  hp=%s", seed, label, results[key]["test_avg"],
                 " ".join(f"{n}={a:.1f}" for n, a in te.items()), hp)

    record("zero_shot", "zero-shot (base)", lambda n: base, {}, None, 0.0)
    ft_models = {n: _module(base, sd) for n, sd in zip(names, ft_sds)}
    record("individual", "individual fine-tunes", ft_models.__getitem__, {}, None, 0.0)
    del ft_models

    def search(kind: str, sds, grid) -> tuple[dict, dict, float, list]:
        """Evaluate every grid point on validation; return best hp, its val accs, merge time, trace."""
        best = None
        trace = []
        for hp in grid:
            t1 = time.perf_counter()
            prov = run_method(kind, hp, base, base_sd, sds, names, cfg, seed)
            merge_s = time.perf_counter() - t1
            va = evaluate(prov, val)
            mean = sum(va.values()) / len(va)
            trace.append({"hp": hp, "val_avg": mean})
            if best is None or mean > best[2]:
                best = (hp, va, mean, merge_s)
        return best[0], best[1], best[3], trace

    selected: dict[str, dict] = {}
    for kind, label in BASE_METHODS.items():
        if not wanted(kind):
            continue
        t1 = time.perf_counter()
        hp, va, merge_s, trace = search(kind, ft_sds, method_grid(kind, cfg))
        selected[kind] = hp
        prov = run_method(kind, hp, base, base_sd, ft_sds, names, cfg, seed)
        record(kind, label, prov, hp, va, merge_s, {"val_trace": trace, "search_s": time.perf_counter() - t1})

    # LoRA-DV spectral rethinking atop TA and TIES (CE on 32 labelled samples per task, or entropy)
    for b in ("ta", "ties"):
        for loss in ("ce", "entropy"):
            key = f"loradv_{loss}_{b}"
            if b not in selected or not wanted(key):
                continue
            t1 = time.perf_counter()
            merged = run_method(b, selected[b], base, base_sd, ft_sds, names, cfg, seed)(names[0])
            res = lora_dv(merged, base_sd, tasks, tok, heads, cfg, seed, loss)
            label = f"LoRA-DV ({'CE, 32 labelled/task' if loss == 'ce' else 'entropy, unlabelled'}) on {BASE_METHODS[b]}"
            record(key, label, lambda n, m=merged: m, dict(selected[b]), None, time.perf_counter() - t1,
                   {"rethink_losses": res.losses, "rethink_layers": len(res.layers)})

    # PAVE + X: purify every fine-tune, then the host method X with X's validated hyper-parameters;
    # rho chosen on validation.
    collected: dict[str, Any] = {}

    def covariances() -> tuple[list, Path]:
        """Covariances of every fine-tune (once per seed) and the folder of their files."""
        if not collected:
            t1 = time.perf_counter()
            covs = []
            cov_dir = Path(cfg.cache_dir) / "covariances" / f"s{seed}-{finetune_key(cfg, tasks[0], seed, 'cov')}"
            cov_dir.mkdir(parents=True, exist_ok=True)
            for t, sd in zip(tasks, ft_sds):
                cs = task_covariances(_module(base, sd), tok, t, cfg)
                covs.append(cs)
                # the covariance file that `pave collect` would write, for the host paths
                cs.save(cov_dir / f"{t.name}.safetensors", model_path=cfg.model_path, max_length=cfg.max_length)
            timings["covariances_s"] = time.perf_counter() - t1
            collected.update(covs=covs, dir=cov_dir)
        return collected["covs"], collected["dir"]

    if any(wanted(f"pave_{t}_{a}_{b}") for t in cfg.pave_targets for a in cfg.pave_allocations for b in cfg.pave_bases):
        covs, cov_dir = covariances()
        layers = linear_weight_names(base)
        cache = PaveCache()
        for target in cfg.pave_targets:
            for allocation in cfg.pave_allocations:
                bases = [b for b in cfg.pave_bases if wanted(f"pave_{target}_{allocation}_{b}") and b in selected]
                if not bases:
                    continue
                best: dict[str, tuple] = {}
                for rho in cfg.rho_grid:
                    t2 = time.perf_counter()
                    psds, stats = pave_purify_pool(base_sd, ft_sds, covs, layers, target=target,
                                                   allocation=allocation, rho=rho, cache=cache)
                    purify_s = time.perf_counter() - t2
                    for b in bases:
                        t3 = time.perf_counter()
                        prov = run_method(b, selected[b], base, base_sd, psds, names, cfg, seed)
                        merge_s = time.perf_counter() - t3
                        va = evaluate(prov, val)
                        mean = sum(va.values()) / len(va)
                        tr = best.get(b, (None, None, -1.0, None, None, []))[5] + [{"rho": rho, "val_avg": mean}]
                        if mean > best.get(b, (None, None, -1.0))[2]:
                            best[b] = (rho, va, mean, stats, purify_s + merge_s, tr)
                        else:
                            best[b] = best[b][:5] + (tr,)
                    del psds
                for b, (rho, va, _, stats, merge_s, tr) in best.items():
                    t3 = time.perf_counter()
                    try:  # the final merge through the host plugin: FusionBench `pave/pave`
                        if cfg.pave_host_final is not None and b not in cfg.pave_host_final:
                            raise _CorePath("harness core path chosen (--pave-host-final)")
                        prov = run_pave_host(b, selected[b], target, allocation, rho, base, base_sd, ft_sds,
                                             str(cov_dir), names, cfg, seed)
                        stats = {**stats, "final_path": "pave_plugins.fusion_bench.PAVEAlgorithm"}
                    except Exception as exc:  # keep the run going; say so in the JSON
                        if not isinstance(exc, _CorePath):
                            log.warning("PAVE host path failed (%s); using the harness's core path", exc)
                        psds, _ = pave_purify_pool(base_sd, ft_sds, covs, layers, target=target,
                                                   allocation=allocation, rho=rho, cache=cache)
                        prov = run_method(b, selected[b], base, base_sd, psds, names, cfg, seed)
                        stats = {**stats, "final_path": f"core ({exc})"}
                        del psds
                    merge_s = time.perf_counter() - t3
                    label = f"PAVE({'eq.6' if target == 'weight' else 'task vec'}, {allocation}) + {BASE_METHODS[b]}"
                    record(f"pave_{target}_{allocation}_{b}", label, prov, {**selected[b], "rho": rho}, va, merge_s,
                           {"pave": stats, "val_trace": tr})
        del cache
    lora_selected = run_lora_experts(cfg, seed, tasks, tok, base, base_sd, heads, wanted, search, record, timings)
    run_mergekit_paths(cfg, seed, tasks, base, base_sd, ft_sds, wanted, evaluate, val, record, covariances,
                       lora_selected, timings)
    timings["seed_total_s"] = time.perf_counter() - t_seed
    return {"seed": seed, "methods": results, "timings": timings}


def run_lora_experts(cfg: BenchConfig, seed: int, tasks: list[Task], tok, base: nn.Module, base_sd, heads, wanted,
                     search, record, timings) -> dict[str, tuple[dict, list[Path]]]:
    """LoRA experts of the tasks: individual, merged by TA / TIES / TSV-M (ours and FusionBench's;
    lambda or alpha on validation), and LoRA-DV (CE, ``cfg.calib_per_task`` labelled samples per task) on those merges.
    Returns ``{base method: (chosen hp, adapter folders)}`` for the mergekit ``base+adapter`` path."""
    keys = ["lora_experts_individual"] + [f"lora_experts_{b}" for b in ("ta", "ties", "tsvm", "tsvm_fb")] \
        + [f"lora_experts_loradv_ce_{b}" for b in ("ta", "ties")] + ["mergekit_lora_ties"]
    if not any(wanted(k) for k in keys):
        return {}
    from pave_plugins.bench import hosts

    names = [t.name for t in tasks]
    t1 = time.perf_counter()
    adapters = [hosts.finetune_lora(base, tok, t, heads[t.name], cfg, seed) for t in tasks]
    lora_sds = [hosts.lora_dense_state_dict(base, a) for a in adapters]
    timings["lora_experts_s"] = time.perf_counter() - t1
    rank = {"rank": cfg.lora_rank, "lr": cfg.lora_lr}
    if wanted("lora_experts_individual"):
        experts = {n: _module(base, sd) for n, sd in zip(names, lora_sds)}
        record("lora_experts_individual", f"LoRA experts (r={cfg.lora_rank}), individual", experts.__getitem__,
               rank, None, 0.0)
        del experts
    selected = {}
    for b in ("ta", "ties", "tsvm", "tsvm_fb"):
        needed_by = [f"lora_experts_{b}", f"lora_experts_loradv_ce_{b}"] + (["mergekit_lora_ties"] if b == "ties" else [])
        if not any(wanted(k) for k in needed_by):
            continue
        t1 = time.perf_counter()
        hp, va, merge_s, trace = search(b, lora_sds, method_grid(b, cfg))
        selected[b] = (hp, adapters)
        record(f"lora_experts_{b}", f"LoRA experts + {BASE_METHODS[b]}",
               run_method(b, hp, base, base_sd, lora_sds, names, cfg, seed), {**hp, **rank}, va, merge_s,
               {"val_trace": trace, "search_s": time.perf_counter() - t1})
        if b in ("ta", "ties") and wanted(f"lora_experts_loradv_ce_{b}"):
            t1 = time.perf_counter()
            merged = run_method(b, hp, base, base_sd, lora_sds, names, cfg, seed)(names[0])
            res = lora_dv(merged, base_sd, tasks, tok, heads, cfg, seed, "ce")
            record(f"lora_experts_loradv_ce_{b}", f"LoRA-DV (CE) on LoRA experts + {BASE_METHODS[b]}",
                   lambda n, m=merged: m, {**hp, **rank}, None, time.perf_counter() - t1,
                   {"rethink_losses": res.losses, "rethink_layers": len(res.layers)})
    return selected


def run_mergekit_paths(cfg: BenchConfig, seed: int, tasks: list[Task], base: nn.Module, base_sd, ft_sds, wanted,
                       evaluate, val, record, covariances, lora_selected, timings) -> None:
    """Merges through mergekit's own ``run_merge`` on Hugging Face folders of the fine-tunes:
    stock ``ties`` (lambda on validation), ``pave`` + ``ties`` for each PAVE target (rho on
    validation, TIES settings of the stock run) and stock ``ties`` on LoRA experts given as
    ``base+adapter`` (mergekit merges the adapters with PEFT; lambda of ``lora_experts_ties``)."""
    keys = ["mergekit_ties", "mergekit_lora_ties"] + [f"mergekit_pave_{t}_ties" for t in cfg.pave_targets]
    if not any(wanted(k) for k in keys):
        return
    from pave_plugins.bench import hosts

    t0 = time.perf_counter()
    names = [t.name for t in tasks]
    work = Path(cfg.cache_dir) / "mergekit" / f"s{seed}-{finetune_key(cfg, tasks[0], seed, 'hf')}"
    template = hosts.seqcls_wrapper(base)
    base_dir = str(hosts.save_hf_folder(template, base_sd, work / "base"))
    ft_dirs = [str(hosts.save_hf_folder(template, sd, work / t.name)) for t, sd in zip(tasks, ft_sds)]
    timings["mergekit_export_s"] = time.perf_counter() - t0
    density = cfg.mergekit_density

    def merged_provider(recipe: dict) -> tuple[Provider, float]:
        t1 = time.perf_counter()
        model = _module(base, hosts.run_mergekit(recipe, work))
        return (lambda task: model), time.perf_counter() - t1

    def choose(key: str, label: str, recipes: list[tuple[dict, dict]]) -> dict:
        """Merge every recipe, keep the best on validation, record it; returns its hp."""
        best = None
        trace = []
        for hp, recipe in recipes:
            prov, merge_s = merged_provider(recipe)
            va = evaluate(prov, val)
            mean = sum(va.values()) / len(va)
            trace.append({"hp": hp, "val_avg": mean})
            if best is None or mean > best[2]:
                best = (hp, va, mean, merge_s, prov, recipe)
        hp, va, _, merge_s, prov, recipe = best
        record(key, label, prov, hp, va, merge_s, {"val_trace": trace, "recipe": recipe})
        return hp

    ties_hp: dict = {}
    if any(wanted(k) for k in keys if k != "mergekit_lora_ties"):  # the pave runs reuse its lambda
        ties_hp = choose("mergekit_ties", f"mergekit ties (density {density})",
               [({"lambda": v, "density": density}, hosts.ties_recipe(base_dir, ft_dirs, v, density))
                for v in cfg.ties_grid])
    for target in cfg.pave_targets:
        key = f"mergekit_pave_{target}_ties"
        if not wanted(key):
            continue
        _, cov_dir = covariances()
        cov_files = [str(cov_dir / f"{n}.safetensors") for n in names]
        lam = ties_hp["lambda"]
        choose(key, f"mergekit pave({'eq.6' if target == 'weight' else 'task vec'}, spectral) + ties",
               [({"lambda": lam, "density": density, "rho": rho},
                 hosts.pave_recipe(base_dir, ft_dirs, cov_files, lam, density, rho, target, "spectral"))
                for rho in cfg.rho_grid])
    if wanted("mergekit_lora_ties") and "ties" in lora_selected:
        hp, adapters = lora_selected["ties"]
        choose("mergekit_lora_ties", "mergekit ties on LoRA experts (base+adapter)",
               [({**hp, "density": density},
                 hosts.ties_recipe(base_dir, [f"{base_dir}+{a}" for a in adapters], hp["lambda"], density))])


def lora_dv(merged: nn.Module, base_sd: dict[str, Tensor], tasks: list[Task], tok, heads: dict[str, Tensor],
            cfg: BenchConfig, seed: int, loss: str):
    """LoRA-DV (eq. 8-13) through :func:`pave_plugins.core.rethink.rethink`, in place on ``merged``.

    Calibration: ``cfg.calib_per_task`` training examples per task (labels used only with CE);
    each batch holds one task's examples and is scored with that task's frozen head.
    """
    from pave_plugins.core.rethink import RethinkConfig, entropy_loss, rethink

    calib = []
    for t in tasks:
        g = torch.Generator().manual_seed(seed + 1000)
        idx = torch.randperm(len(t.splits["train"]), generator=g)[: cfg.calib_per_task].tolist()
        for ids, mask, y in make_batches(tok, [t.splits["train"][i] for i in idx], cfg.calib_per_task,
                                         cfg.max_length, sort=False):
            calib.append((t.name, ids, mask, y))

    def loss_fn(forward, batch):
        name, ids, mask, y = batch
        out = forward(input_ids=ids, attention_mask=mask)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        m = mask.unsqueeze(-1).to(h.dtype)
        z = cfg.scale * F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1) @ heads[name].T
        return F.cross_entropy(z, y) if loss == "ce" else entropy_loss(z)

    layers = [k for k, v in merged.state_dict().items() if v.ndim == 2 and k not in cfg.exclude_keys]
    return rethink(merged, base_sd, calib, loss_fn, layers=layers,
                   config=RethinkConfig(iterations=cfg.rethink_iterations, epochs=cfg.rethink_epochs,
                                        lr=cfg.rethink_lr, seed=seed, progress=False))


def summarise(per_seed: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Mean and spread over seeds: per-task test accuracy, average, normalised (merged / individual)."""
    keys = list(per_seed[0]["methods"])
    out = {}
    for k in keys:
        rows = [s["methods"][k] for s in per_seed if k in s["methods"]]
        avg = [r["test_avg"] for r in rows]
        norm = []
        for s in per_seed:
            if k in s["methods"]:
                ind = s["methods"]["individual"]["test"]
                norm.append(100.0 * sum(s["methods"][k]["test"][n] / ind[n] for n in names) / len(names))
        per_task = {n: sum(r["test"][n] for r in rows) / len(rows) for n in names}

        def sd(x):
            m = sum(x) / len(x)
            return math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1)) if len(x) > 1 else 0.0

        out[k] = {"label": rows[0]["label"], "per_task": per_task, "avg": sum(avg) / len(avg), "avg_sd": sd(avg),
                  "avg_min": min(avg), "avg_max": max(avg), "norm": sum(norm) / len(norm), "norm_sd": sd(norm),
                  "hp": [r["hp"] for r in rows], "n_seeds": len(rows)}
        rel = [r["pave"]["mean_rel_change"] for r in rows if "pave" in r]
        if rel:
            out[k]["mean_rel_change"] = sum(rel) / len(rel)
    return out


def markdown_table(summary: dict[str, Any], names: list[str]) -> str:
    head = "| method | " + " | ".join(names) + " | avg (± sd) | normalised | chosen hp (per seed) | ‖ΔW_PAVE−ΔW‖/‖ΔW‖ |"
    sep = "|" + "---|" * (len(names) + 5)
    lines = [head, sep]
    for k, s in summary.items():
        hp = "; ".join(",".join(f"{a}={(f'{b:.4g}' if isinstance(b, float) else b)}" for a, b in h.items()) or "–" for h in s["hp"])
        rel = f"{s['mean_rel_change']:.2f}" if "mean_rel_change" in s else ""
        lines.append(f"| {s['label']} | " + " | ".join(f"{s['per_task'][n]:.1f}" for n in names)
                     + f" | {s['avg']:.1f} ± {s['avg_sd']:.1f} | {s['norm']:.1f} | {hp} | {rel} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in summary if k != "individual"]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(keys) + 1.5))
    y = list(range(len(keys)))[::-1]
    vals = [summary[k]["norm"] for k in keys]
    errs = [summary[k]["norm_sd"] for k in keys]
    colors = ["tab:gray" if k == "zero_shot" else "tab:orange" if k.startswith("pave") else "tab:blue" for k in keys]
    ax.barh(y, vals, xerr=errs, color=colors, capsize=2)
    ax.set_yticks(y, [summary[k]["label"] for k in keys], fontsize=7)
    ax.axvline(100, color="k", lw=0.8, ls="--")
    ax.set_xlim(min(vals) - 5, 102)
    ax.set_xlabel("normalised test accuracy (merged / individual, %), mean ± sd over seeds")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Run all seeds and write ``results.json``, ``results.md`` and ``results.png`` into ``out_dir``."""
    _threads(cfg)
    t0 = time.perf_counter()
    tasks = [load_task(Path(cfg.data_dir) / n) for n in cfg.tasks]
    tok, base = load_base(cfg.model_path)
    per_seed = []
    for s in cfg.seeds:
        per_seed.append(run_seed(cfg, s, tasks, tok, base))
        write_results(cfg, tasks, per_seed, t0)
    return write_results(cfg, tasks, per_seed, t0)


def write_results(cfg: BenchConfig, tasks: list[Task], per_seed: list[dict], t0: float) -> dict[str, Any]:
    """Write ``results.json``, ``results.md`` and ``results.png`` for the seeds done so far."""
    from pave_plugins.io.atomic import atomic_path

    names = [t.name for t in tasks]
    summary = summarise(per_seed, names)
    result = {"config": dataclasses.asdict(cfg), "tasks": {t.name: {"labels": t.labels, "digest": t.digest,
              "sizes": {s: len(t.splits[s]) for s in SPLITS}} for t in tasks},
              "environment": {"python": platform.python_version(), "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "machine": platform.machine(),
                              "processor": platform.processor() or platform.machine(), "device": "cpu"},
              "per_seed": per_seed, "summary": summary, "total_s": time.perf_counter() - t0}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "results.json") as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1, default=str))
    md = markdown_table(summary, names)
    with atomic_path(out / "results.md") as tmp:
        Path(tmp).write_text(f"Test accuracy (%), mean over seeds {[p['seed'] for p in per_seed]}; {len(names)} tasks, "
                             f"{cfg.steps}-step fine-tunes; hyper-parameters chosen on validation.\n\n" + md)
    try:
        plot(summary, out / "results.png",
             f"{len(names)} tasks, {cfg.steps}-step fine-tunes, seeds {[p['seed'] for p in per_seed]}")
    except ImportError:
        log.warning("matplotlib not installed: no plot (pip install 'pave-plugins[bench]')")
    log.info("wrote %s (%.0f s)\n%s", out, time.perf_counter() - t0, md)
    return result

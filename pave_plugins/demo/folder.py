"""The files of the demo folder besides the models: tokenizer, calibration data, recipes, bench inputs.

``pave demo --out DIR`` leaves a folder on which every command of the README runs as printed:

- ``data/task_k.jsonl``: calibration records of task k (``text`` for ``pave collect``, ``input`` and
  ``target`` for ``pave rethink``);
- ``mergekit/*.yaml``: mergekit recipes for every method (absolute paths: mergekit reads ``a/b`` as
  a hub id);
- ``fusion_bench/``: a FusionBench config folder (``--config-dir``) with the model pool ``pave_demo``
  and the methods ``pave_demo/*``;
- ``bench/``: a tiny random BERT with a word-level tokenizer and two small text-classification
  tasks in the layout of ``pave bench``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

VOCAB = 48  # task tokens w0 .. w47; the tokenizer adds <pad> as id 48
SEQ = 12


def word_tokenizer(vocab: int = VOCAB):
    """A word-level tokenizer over ``w0 .. w{vocab-1}`` (ids 0 .. vocab-1) plus ``<pad>`` (id vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)}
    words["<pad>"] = vocab
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<pad>")


def ids_to_text(ids) -> str:
    return " ".join(f"w{int(i)}" for i in ids)


def write_calibration(path: Path, batch: torch.Tensor, split: int = SEQ // 2) -> Path:
    """One jsonl record per row of ``batch``: the whole sequence as ``text``, its halves as input/target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": ids_to_text(row), "input": ids_to_text(row[:split]), "target": ids_to_text(row[split:])})
             for row in batch]
    path.write_text("\n".join(lines) + "\n")
    return path


def mergekit_recipe(method: str, base: Path, models: list[Path], covs: list[Path] | None = None,
                    per_model: dict | None = None, **params) -> str:
    """A mergekit YAML recipe with absolute paths (``tsv`` takes no per-model ``weight``)."""
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for i, m in enumerate(models):
        lines.append(f"  - model: {m}")
        pm = {**({} if method == "tsv" else {"weight": 1.0}), **(per_model or {})}
        if covs is not None:
            pm["covariance"] = str(covs[i])
        if pm:
            lines.append("    parameters: " + json.dumps(pm))
    if params:
        lines.append("parameters: " + json.dumps(params))
    lines.append("dtype: float32")
    return "\n".join(lines) + "\n"


def mergekit_recipes(base: Path, fts: list[Path], covs: list[Path], rho: float, lam: float) -> dict[str, str]:
    """Every method of the README, as mergekit recipes (name -> YAML)."""
    lam_p = {"lambda": lam}
    return {
        "task_arithmetic": mergekit_recipe("task_arithmetic", base, fts, **lam_p),
        "ties": mergekit_recipe("ties", base, fts, per_model={"density": 0.5}, **lam_p),
        "pave_ta": mergekit_recipe("pave", base, fts, covs, inner="task_arithmetic", rho=rho, **lam_p),
        "pave_ties": mergekit_recipe("pave", base, fts, covs, per_model={"density": 0.5}, inner="ties", rho=rho, **lam_p),
        "pave_dare_ties": mergekit_recipe("pave", base, fts, covs, per_model={"density": 0.5}, inner="dare_ties",
                                          rho=rho, target="delta", **lam_p),
        "tsv_m": mergekit_recipe("tsv", base, fts, alpha=1.0),
    }


def write_fusion_bench_configs(root: Path, base: Path, fts: list[Path], covs: list[Path], rho: float) -> Path:
    """``root/fusion_bench``: model pool ``pave_demo`` and methods ``pave_demo/<name>`` (use with --config-dir)."""
    folder = root / "fusion_bench"
    (folder / "modelpool").mkdir(parents=True, exist_ok=True)
    (folder / "method" / "pave_demo").mkdir(parents=True, exist_ok=True)
    names = [f"task_{k}" for k in range(len(fts))]
    models = {"_pretrained_": str(base), **{n: str(p) for n, p in zip(names, fts)}}
    pool = ["# the demo's models as a FusionBench CausalLMPool (absolute paths)",
            "defaults:", "  - /modelpool/pave/causal_lm_local@_here_", "  - _self_",
            f"tokenizer: {base}", "models: " + json.dumps(models)]
    (folder / "modelpool" / "pave_demo.yaml").write_text("\n".join(pool) + "\n")
    cov_map = json.dumps({n: str(c) for n, c in zip(names, covs)})
    for name in ("pave_ta", "pave_ties", "pave_tsv_m"):
        lines = [f"# pave/{name} with the demo's covariance files", "defaults:", f"  - /method/pave/{name}@_here_",
                 "  - _self_", f"rho: {rho}", "covariances: " + cov_map]
        (folder / "method" / "pave_demo" / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    lines = ["# TSV-M", "defaults:", "  - /method/pave/tsv_m@_here_", "  - _self_", "alpha: 1.0"]
    (folder / "method" / "pave_demo" / "tsv_m.yaml").write_text("\n".join(lines) + "\n")
    return folder


# two small text-classification tasks for `pave bench`: label name -> the words that signal it
BENCH_TASKS = {
    "colours": {"red": ["cherry", "blood", "ruby", "brick"], "green": ["grass", "leaf", "lime", "moss"],
                "blue": ["sky", "sea", "navy", "ice"]},
    "animals": {"bird": ["wing", "feather", "beak", "nest"], "fish": ["fin", "gill", "scale", "reef"]},
}
FILLER = ["the", "a", "one", "this", "is", "was", "very", "some", "and", "of", "near", "with"]


def write_bench_inputs(root: Path, seed: int = 0) -> Path:
    """``root/bench``: ``model/`` (tiny random BERT + word-level tokenizer) and ``data/<task>/``."""
    rng = random.Random(seed)
    folder = root / "bench"
    for task, classes in BENCH_TASKS.items():
        tdir = folder / "data" / task
        tdir.mkdir(parents=True, exist_ok=True)
        (tdir / "labels.json").write_text(json.dumps({"task": task, "labels": list(classes)}, indent=1) + "\n")
        for split, per_class in (("train", 40), ("validation", 8), ("test", 16)):
            rows = []
            for label, (_, cues) in enumerate(classes.items()):
                for _ in range(per_class):
                    words = [rng.choice(cues)] + rng.sample(FILLER, 4)
                    rng.shuffle(words)
                    rows.append(json.dumps({"text": " ".join(words), "label": label}))
            (tdir / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    _tiny_bert(folder / "model", seed)
    return folder


def _tiny_bert(folder: Path, seed: int) -> None:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w for classes in BENCH_TASKS.values() for label, cues in classes.items() for w in [label, *cues]}
                   | set(FILLER))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, initializer_range=0.5)
    folder.mkdir(parents=True, exist_ok=True)
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)

"""The benchmark tests' data (two tasks of the shipped snapshot) and their tiny random BERT."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "real" / "data"


TASKS = ["sentiment", "dictionary"]


def tiny_bert_folder(folder: Path) -> str:
    from transformers import BertModel, BertTokenizerFast

    from tiny_models import tiny_bert_config

    words: Counter[str] = Counter()
    for t in TASKS:
        for line in (DATA / t / "train.jsonl").read_text().splitlines():
            words.update(re.findall(r"\w+|[^\w\s]", json.loads(line)["text"].lower()))
    labels = [w for t in TASKS for lab in json.loads((DATA / t / "labels.json").read_text())["labels"]
              for w in lab.lower().split()]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(labels) | {w for w, _ in words.most_common(3000)})
    folder.mkdir(parents=True)
    # transformers 5: the constructor takes the vocabulary as a dict (vocab_file= is ignored there)
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(dict.fromkeys(vocab))}, do_lower_case=True)
    torch.manual_seed(0)
    cfg = tiny_bert_config(vocab_size=len(tok), num_attention_heads=2, intermediate_size=64,
                           initializer_range=0.5)  # distinct random label embeddings (0.02 makes them ~collinear)
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)

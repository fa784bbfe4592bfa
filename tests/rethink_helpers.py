"""Tiny models and data for the LoRA-DV rethinking tests (built in code, no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_models import tiny_bert_config, tiny_llama_config

WORDS = "the a movie film good bad great awful plot actor cat dog sat on mat yes no red blue one two three".split()


def tiny_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A", pair="[CLS] $A [SEP] $B", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", eos_token="</s>"
    )
    fast.save_pretrained(folder)
    return fast


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def random_sentences(n: int, seed: int, length=(3, 7)) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(length[0], length[1] + 1, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)))
    return out


def perturb_(model, scale: float, seed: int, skip=()) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in skip):
                continue
            p.add_(scale * p.std().clamp_min(1e-3) * torch.randn(p.shape, generator=g))


def bert_config(num_labels: int):
    return tiny_bert_config(
        vocab_size=len(WORDS) + 5, hidden_size=16, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=num_labels, pad_token_id=0,
    )


def llama_config():
    return tiny_llama_config(
        vocab_size=len(WORDS) + 5, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        pad_token_id=0, eos_token_id=4, bos_token_id=2,
    )


def build_seq_cls(tmp: Path):
    """base, two fine-tuned classifiers (2 and 3 labels), a task-arithmetic merge of their bodies,
    and a jsonl per task."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    tiny_tokenizer(tmp / "tok")
    base = BertForSequenceClassification(bert_config(2))
    dirs = {}
    base.save_pretrained(tmp / "base")
    tiny_tokenizer(tmp / "base")
    fts = {}
    for i, (task, labels) in enumerate((("sent", 2), ("topic", 3))):
        ft = BertForSequenceClassification(bert_config(labels))
        sd = {k: v for k, v in base.state_dict().items() if not k.startswith("classifier")}
        ft.load_state_dict(sd, strict=False)
        perturb_(ft, 0.2, seed=10 + i, skip=("classifier", "embeddings"))
        ft.save_pretrained(tmp / task)
        dirs[task] = tmp / task
        fts[task] = ft
    merged = BertForSequenceClassification(bert_config(2))
    msd = {}
    bsd = base.state_dict()
    for k, v in bsd.items():
        if k.startswith("classifier"):
            msd[k] = v
        else:
            msd[k] = v + sum(f.state_dict()[k] - v for f in fts.values())
    merged.load_state_dict(msd)
    merged.save_pretrained(tmp / "merged")
    tiny_tokenizer(tmp / "merged")
    (tmp / "merged" / "README.md").write_text("# merged by mergekit\n\nsome card\n")
    calib = {
        "sent": write_jsonl(tmp / "sent.jsonl", [{"text": s, "label": j % 2} for j, s in enumerate(random_sentences(12, 1))]),
        "topic": write_jsonl(tmp / "topic.jsonl", [{"text": s, "b": "cat", "label": j % 3} for j, s in enumerate(random_sentences(12, 2))]),
    }
    return dirs, calib, fts


def build_llama_lora(tmp: Path, n_adapters: int = 2):
    """A tiny Llama base with PEFT LoRA adapters (non-zero B) and text-to-text calibration data."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config())
    base.save_pretrained(tmp / "base")
    tiny_tokenizer(tmp / "base")
    adapters = {}
    for i in range(n_adapters):
        m = LlamaForCausalLM(llama_config())
        m.load_state_dict(base.state_dict())
        cfg = LoraConfig(r=2 + i, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
        pm = get_peft_model(m, cfg)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n or "lora_A" in n:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        pm.save_pretrained(tmp / f"lora{i}")
        adapters[f"t{i}"] = tmp / f"lora{i}"
    recs = [{"input": s, "target": t} for s, t in zip(random_sentences(8, 3), random_sentences(8, 4, (1, 3)))]
    calib = write_jsonl(tmp / "gen.jsonl", recs)
    return adapters, calib


# ----------------------------------------------------------------------------- FusionBench toys
class ToyMLP(torch.nn.Module):
    def __init__(self, d: int = 8, h: int = 16, c: int = 2):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, h)
        self.fc2 = torch.nn.Linear(h, h)
        self.head = torch.nn.Linear(h, c)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def toy_xy(task: str, n: int = 32, seed: int = 0):
    """Task ``a``: class = sign of x0; task ``b``: class = sign of x1."""
    g = torch.Generator().manual_seed(seed + (0 if task == "a" else 1))
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0 if task == "a" else 1] > 0).long()
    return x, y


def toy_dataset(task: str, n: int = 32, seed: int = 0):
    return torch.utils.data.TensorDataset(*toy_xy(task, n, seed))


def toy_pool_models(seed: int = 0):
    """base + two fine-tuned ToyMLPs (40 Adam steps each on their task)."""
    torch.manual_seed(seed)
    base = ToyMLP()
    fts = {}
    for task in ("a", "b"):
        m = ToyMLP()
        m.load_state_dict(base.state_dict())
        x, y = toy_xy(task, 128, seed=100)
        opt = torch.optim.Adam(m.parameters(), lr=0.05)
        with torch.enable_grad():
            for _ in range(40):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(m(x), y).backward()
                opt.step()
        fts[task] = m
    return base, fts

"""Tiny models and an offline tokenizer for the covariance-collection tests (no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import tiny_models
import torch

WORDS = (
    "the a an cat dog bird fish runs jumps sleeps eats quickly slowly red blue green big small "
    "on under over house tree river and or not very happy sad good bad today yesterday sentence"
).split()


def make_tokenizer(padding_side: str = "right"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.padding_side = padding_side
    return fast


def vocab_size() -> int:
    return 4 + len(WORDS)


def tiny_llama(seed: int = 0, layers: int = 2):
    return tiny_models.tiny_llama(
        seed, vocab_size=vocab_size(), hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )


def tiny_bert(seed: int = 0):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = tiny_models.tiny_bert_config(
        vocab_size=vocab_size(), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24, pad_token_id=0,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = tiny_models.tiny_gpt2_config(vocab_size=vocab_size(), bos_token_id=2, eos_token_id=3, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def save_model_dir(path: Path, model=None) -> Path:
    model = model if model is not None else tiny_llama()
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


TEXTS = [
    "the cat runs quickly",
    "a big red dog jumps over the small house",
    "the bird sleeps",
    "fish eats very slowly under the green tree today",
    "the happy cat and the sad dog",
    "a river",
    "blue bird jumps on the big tree and sleeps",
    "the bad fish",
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def capture_inputs(model, batch):
    """Independent reference: ``{module name: [inputs]}`` of every nn.Linear via our own pre-hooks."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: seen.setdefault(name, []).append(args[0].detach().clone())))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def collected_family(root: Path, make_model, texts: list[str] = TEXTS) -> dict:
    """A base ``make_model(seed=0)``, two fine-tunes (seeded random updates) and their covariance
    files written by `pave collect` (model 0 reads ``texts``, model 1 the same texts reversed)."""
    from pave_plugins.cli import main

    base_dir = save_model_dir(root / "base", make_model(seed=0))
    fts, covs = [], []
    for i in range(2):
        ft = make_model(seed=0)
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.1))
        d = save_model_dir(root / f"ft{i}", ft)
        rows = [{"text": t} for t in (texts if i == 0 else [" ".join(reversed(t.split())) for t in texts])]
        data = write_jsonl(root / f"d{i}.jsonl", rows)
        cov = root / f"cov{i}.safetensors"
        assert main(["collect", "--model", str(d), "--data", str(data), "--n-samples", str(len(rows)),
                     "--max-length", "16", "--batch-size", "4", "-o", str(cov), "--no-progress"]) == 0
        fts.append(d)
        covs.append(cov)
    return {"root": root, "base": base_dir, "fts": fts, "covs": covs}

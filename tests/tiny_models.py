"""The one tiny-model factory of the tests: small random configs with overrides (no hub access).

Each test family used to spell out its own config; they now name only what differs from these
defaults, so a new test starts from ``tiny_llama_config(hidden_size=16)`` rather than a copy.
"""

from __future__ import annotations

import torch
from torch import nn

LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
BERT = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, type_vocab_size=2)
GPT2 = dict(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=64)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**LLAMA, **overrides})


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    return BertConfig(**{**BERT, **overrides})


def tiny_gpt2_config(**overrides):
    from transformers import GPT2Config

    return GPT2Config(**{**GPT2, **overrides})


def tiny_llama(seed: int | None = 0, **overrides):
    """A random ``LlamaForCausalLM`` in eval mode; ``seed=None`` leaves torch's generator as it is."""
    from transformers import LlamaForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


class TinyMLP(nn.Module):
    """A tiny classifier for the LoRA-DV tests: two hidden linear layers and a head."""

    def __init__(self, d: int = 12, h: int = 16, c: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, h)
        self.head = nn.Linear(h, c)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))

"""Shared test set-up: no hub access, deterministic CPU threads."""

import os

# Tests build tiny models locally; any attempt to reach the Hugging Face hub must fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

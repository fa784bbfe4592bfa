"""Shared test set-up: no hub access, deterministic CPU threads."""

import os

import pytest
import torch

# fixtures shared across test folders (tiny model families, the bad-input set-up), found by every test
pytest_plugins = ["inputs_helpers", "outputs_helpers"]

# Tests build tiny models locally; any attempt to reach the Hugging Face hub must fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# generated cases (hypothesis): a bounded number in CI, many more with PAVE_HYPOTHESIS=long
try:
    from hypothesis import settings

    settings.register_profile("ci", max_examples=60, derandomize=True, print_blob=True)
    settings.register_profile("long", max_examples=2000, print_blob=True)
    settings.load_profile(os.environ.get("PAVE_HYPOTHESIS", "ci"))
except ImportError:  # the generative tests then fail to import, loudly
    pass


@pytest.fixture
def one_thread():
    """Tiny models: intra-op threading only adds overhead (and contention on a shared 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

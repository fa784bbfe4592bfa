"""The progress bar of LoRA-DV rethinking (``core.rethink`` takes it as an argument: core imports no tqdm)."""

from __future__ import annotations

from typing import Iterable


def tqdm_bar(it: Iterable, desc: str) -> Iterable:
    """A transient ``tqdm`` bar over ``it``."""
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False)

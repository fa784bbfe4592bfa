"""The papers behind the methods, named once: reports, model cards and mergekit's method specs
cite them from here."""

from __future__ import annotations

from typing import NamedTuple


class Paper(NamedTuple):
    title: str
    url: str


PAVE = Paper("PAVE: Purifying task vectors for model merging", "https://arxiv.org/abs/2510.14697")
TSV = Paper("Task Singular Vectors: Reducing Task Interference in Model Merging (Gargiulo et al., CVPR 2025)",
            "https://arxiv.org/abs/2412.00081")
REGMEAN = Paper("Dataless Knowledge Fusion by Merging Weights of Language Models (RegMean; Jin et al., ICLR 2023)",
                "https://arxiv.org/abs/2212.09849")
LORA_DV = Paper("LoRA-DV: Spectral Rethinking for Reducing Task Interference via Difference Vector in Model Merging",
                "anonymous ACL submission; no public URL known")

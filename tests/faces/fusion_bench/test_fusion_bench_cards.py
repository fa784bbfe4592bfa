"""FusionBench merges by ``pave/pave``, ``pave/tsv_m`` and ``pave/regmean`` are saved ready to publish:
the card parses with ``huggingface_hub.ModelCard`` (``base_model`` = the Hub id the base's config
names, ``library_name``, ``merge``/``fusion-bench`` and the method tags), links the papers and names no
path of this machine; the folder holds the pool's tokenizer with its chat template. The program is
FusionBench's own ``save_merged_model`` on a stand-in holding what the CLI gives the method."""

from __future__ import annotations

import copy
import json
import re
from types import SimpleNamespace

import pytest
import torch
from fusion_bench_helpers import covariances_of, save_covariance_file
from huggingface_hub import ModelCard
from rethink_helpers import tiny_tokenizer
from tiny_models import tiny_llama_config

from pave_plugins import papers

HUB_BASE = "org/tiny-base"
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def pool_files(tmp_path_factory):
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("fb_cards")
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, max_position_embeddings=32))
    paths = {"_pretrained_": str(root / "base")}
    base.save_pretrained(paths["_pretrained_"])
    cfg = root / "base" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "_name_or_path": HUB_BASE}))
    covs = {}
    for i, n in enumerate(["task0", "task1"]):
        ft = copy.deepcopy(base)
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        paths[n] = str(root / n)
        ft.save_pretrained(paths[n])
        covs[n] = save_covariance_file(root / f"{n}.safetensors", covariances_of(ft, torch.randint(0, 64, (4, 8), generator=g)))
    tok = tiny_tokenizer(root / "tok")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(root / "tok")
    return root, paths, covs


def run_program(algo, root, paths, save):
    """What ``fusion_bench`` does around ``algo.run``: the pool, ``_program``, then its own saving."""
    from fusion_bench.modelpool import CausalLMPool
    from fusion_bench.programs.fabric_fusion_program import FabricModelFusionProgram

    pool = CausalLMPool(models=dict(paths), tokenizer=str(root / "tok"), model_kwargs={"dtype": "float32"})
    program = SimpleNamespace(merged_model_save_path=str(save), merged_model_save_kwargs=None, modelpool=pool,
                              config=None, log_dir=str(save.parent))
    algo._program = program
    merged = algo.run(pool)
    FabricModelFusionProgram.save_merged_model(program, merged)
    return save


@pytest.mark.parametrize("method, tags, paper", [
    ("pave", ["merge", "fusion-bench", "pave", "task-arithmetic"], papers.PAVE),
    ("tsv_m", ["merge", "fusion-bench", "tsv-m"], papers.TSV),
    ("regmean", ["merge", "fusion-bench", "regmean"], papers.REGMEAN),
])
def test_saved_with_tokenizer_and_publishable_card(pool_files, tmp_path, method, tags, paper):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pave_plugins.fusion_bench import PAVEAlgorithm, RegMeanAlgorithm, TSVMerging

    root, paths, covs = pool_files
    algo = {"pave": lambda: PAVEAlgorithm(inner="task_arithmetic", rho=0.75, covariances=covs),
            "tsv_m": lambda: TSVMerging(alpha=1.0), "regmean": lambda: RegMeanAlgorithm(covariances=covs)}[method]()
    out = run_program(algo, root, paths, tmp_path / "merged")
    AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == TEMPLATE and tok.get_vocab() == AutoTokenizer.from_pretrained(root / "tok").get_vocab()
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == HUB_BASE and card.data.library_name == "transformers" and card.data.tags == tags
    assert f"]({paper.url})" in card.content and "replaced by their folder names" in card.content
    assert str(root) not in card.content and str(tmp_path) not in card.content
    assert not re.search(r"(?<![\w.:/~}-])/(tmp|home|root|work)/", card.content)


def test_user_save_kwargs_win(pool_files, tmp_path):
    """``merged_model_save_kwargs.save_tokenizer=false`` is the user's: no tokenizer then."""
    from fusion_bench.modelpool import CausalLMPool

    from pave_plugins.fusion_bench import TSVMerging
    from pave_plugins.fusion_bench.outputs import save_tokenizer_with_model

    root, paths, _ = pool_files
    pool = CausalLMPool(models=dict(paths), tokenizer=str(root / "tok"))
    algo = TSVMerging()
    algo._program = SimpleNamespace(merged_model_save_path=str(tmp_path), merged_model_save_kwargs={"save_tokenizer": False},
                                    modelpool=pool)
    save_tokenizer_with_model(algo)
    assert algo._program.merged_model_save_kwargs == {"save_tokenizer": False}
    no_tok = SimpleNamespace(merged_model_save_path=str(tmp_path), merged_model_save_kwargs=None,
                             modelpool=CausalLMPool(models=dict(paths), tokenizer=None))
    algo._program = no_tok
    save_tokenizer_with_model(algo)
    assert no_tok.merged_model_save_kwargs is None

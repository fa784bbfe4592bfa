"""The stock `fusion_bench` CLI finds our configs through the Hydra search-path plugin (no
--config-dir) and runs PAVE on tiny local Llama models: merged model, model card, rank report,
and PAVE+EMR saved per task. Subprocesses (~8 s start-up each), so only a few."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusion_bench_helpers import covariances_of, save_covariance_file
from tiny_models import tiny_llama_config

FUSION_BENCH = shutil.which("fusion_bench") or str(Path(sys.executable).with_name("fusion_bench"))
NAMES = ["task0", "task1"]


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    cfg = tiny_llama_config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            max_position_embeddings=32)
    base = LlamaForCausalLM(cfg)
    paths = {"_pretrained_": str(root / "base")}
    base.save_pretrained(paths["_pretrained_"])
    covs = {}
    for i, n in enumerate(NAMES):
        ft = copy.deepcopy(base)
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        paths[n] = str(root / n)
        ft.save_pretrained(paths[n])
        ids = torch.randint(0, 64, (6, 12), generator=g)
        covs[n] = save_covariance_file(root / f"{n}.safetensors", covariances_of(ft, ids))
    return paths, covs


def hydra_dict(d: dict) -> str:
    return "{" + ",".join(f'{k}:"{v}"' for k, v in d.items()) + "}"


def run_cli(args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([FUSION_BENCH, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_cli_searchpath_shows_plugin(tmp_path):
    proc = run_cli(["--info", "searchpath"], tmp_path)
    assert "pkg://pave_plugins.configs" in proc.stdout


def test_cli_pave_ta_saves_model_card_and_report(llamas, tmp_path):
    paths, covs = llamas
    run_cli(
        [
            "method=pave/pave_ta", "method.rho=0.75", "method.gamma=0.5",
            f"method.covariances={hydra_dict(covs)}",
            "modelpool=pave/causal_lm_local", f"modelpool.models={hydra_dict(paths)}",
            "~taskpool", 'merged_model_save_path="{log_dir}/merged"',
        ],
        tmp_path,
    )
    cards = list(tmp_path.rglob("merged/README.md"))
    assert len(cards) == 1, list(tmp_path.rglob("*"))
    merged_dir = cards[0].parent
    card = cards[0].read_text()
    assert "arxiv.org/abs/2510.14697" in card and "pave_plugins.fusion_bench.PAVEAlgorithm" in card
    assert "rho: 0.75" in card and "inner: task_arithmetic" in card and "CausalLMPool" in card
    reports = list(tmp_path.rglob("pave_rank_report.json"))
    assert len(reports) == 1
    rep = json.loads(reports[0].read_text())
    assert rep["settings"]["rho"] == 0.75 and set(rep["models"]) == set(NAMES)
    assert rep["tensors"]["model.layers.0.self_attn.q_proj.weight"]["purified"] and rep["timings"]["total_s"] > 0

    # same weights as the Python API run of the same method on the same pool
    from fusion_bench.modelpool import CausalLMPool
    from transformers import AutoModelForCausalLM

    from pave_plugins.fusion_bench import PAVEAlgorithm

    pool = CausalLMPool(models=dict(paths), tokenizer=None, model_kwargs={"torch_dtype": "float32"})
    ref = PAVEAlgorithm(inner="task_arithmetic", rho=0.75, gamma=0.5, covariances=covs).run(pool)
    saved = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    ref_sd = ref.state_dict()
    for k, v in saved.state_dict().items():
        assert torch.allclose(v, ref_sd[k], rtol=0, atol=0), k


def test_cli_pave_emr_saves_one_model_per_task(llamas, tmp_path):
    paths, covs = llamas
    run_cli(
        [
            "method=pave/pave_emr", "method.rho=0.75",
            f"method.covariances={hydra_dict(covs)}",
            "modelpool=pave/causal_lm_local", f"modelpool.models={hydra_dict(paths)}",
            "~taskpool", f'merged_model_save_path="{tmp_path}/emr"',
        ],
        tmp_path,
    )
    for n in NAMES:
        assert (tmp_path / "emr" / n / "config.json").is_file()
    card = (tmp_path / "emr" / "README.md").read_text()
    assert "EMRMerging" in card and "arxiv.org/abs/2510.14697" in card


@pytest.mark.parametrize("bad", ["unknown covariance key", "report onto a model"])
def test_cli_bad_input_is_one_line_without_traceback(llamas, tmp_path, bad):
    """A bad input of a pave/* algorithm: the fusion_bench CLI fails with the one-line message
    (FusionBench's log line and Hydra's), no traceback; the same run from Python raises the
    package's own exception type."""
    paths, covs = llamas
    covs = dict(covs)
    extra = []
    if bad == "unknown covariance key":
        covs["task_z"] = covs[NAMES[0]]
        needle = "method.covariances names ['task_z'], which the model pool does not have"
    else:
        extra = [f"+method.report_path={paths[NAMES[0]]}/config.json"]
        needle = "lies inside the input modelpool.models"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    args = ["method=pave/pave_ta", f"method.covariances={hydra_dict(covs)}", "modelpool=pave/causal_lm_local",
            f"modelpool.models={hydra_dict(paths)}", "~taskpool", *extra]
    proc = subprocess.run([FUSION_BENCH, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out, out[-3000:]
    assert any(needle in line for line in out.splitlines()), out[-3000:]

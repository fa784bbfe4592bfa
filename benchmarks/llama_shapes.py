"""PAVE at LLaMA-7B shapes on the CPU: stock ``mergekit-yaml`` ``pave`` + ``ties`` against stock ``ties``.

A synthetic LLaMA-7B-shaped model (hidden 4096, intermediate 11008, 32 heads, a small word-level
vocabulary) with ``--layers`` decoder layers, a random base and K = 2 fine-tunes (base + a low-rank
update plus noise at 1e-3 of each weight), saved as Hugging Face folders. Measured, each command
in its own process (wall seconds and that process's peak RSS, from ``os.wait4``):

* ``pave collect`` on each fine-tune (``--tokens`` calibration tokens): tokens per second;
* stock ``mergekit-yaml`` with ``ties`` and with ``pave`` (inner ``ties``, rho = 15/16) on the same models;
* one float64 CO-SVD (what PAVE computes per weight and model) of each LLaMA weight shape, in process,

and the projection of the ``pave`` merge to 32 decoder layers:
``t_32 ~ 32 * K * sum over the 7 weights of a decoder layer of t_CO-SVD(shape) + t_ties(32 layers)``.

    python benchmarks/llama_shapes.py --work DIR --json results.json        # ~1 h on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

BIN = Path(sys.executable).parent
WORDS = [f"w{i}" for i in range(250)]
# the 7 weights of a LLaMA decoder layer (out x in): q, k, v, o, gate, up, down
LAYER_SHAPES = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]


def build(root: Path, layers: int, k: int, seed: int = 0) -> dict[str, Path]:
    from gpu_check import word_tokenizer  # this folder is on the script's path
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_tokenizer(WORDS)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=512,
                      pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    paths = {"base": root / "base"}
    if not (paths["base"] / "config.json").is_file():
        model.save_pretrained(paths["base"])
        tok.save_pretrained(paths["base"])
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(k):
        paths[f"ft{i}"] = root / f"ft{i}"
        if (paths[f"ft{i}"] / "config.json").is_file():
            continue
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.ndim == 2:
                    a, b = torch.randn(p.shape[0], 16, generator=g), torch.randn(16, p.shape[1], generator=g)
                    tv = (a @ b) / 4 + torch.randn(p.shape, generator=g)
                    p.copy_(base[n] + 1e-3 * base[n].norm() / tv.norm() * tv)
        model.save_pretrained(paths[f"ft{i}"])
        tok.save_pretrained(paths[f"ft{i}"])
    rng = random.Random(seed)
    paths["data"] = root / "calib.jsonl"
    paths["data"].write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(128))}) + "\n"
                                     for _ in range(1024)))
    return paths


def run_measured(cmd: list[str]) -> dict:
    """Wall and CPU seconds and peak RSS (MiB) of one command in its own process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}: exit {proc.returncode}\n{out[-2000:]}")
    # CPU seconds too: wall time on a shared machine depends on what else runs
    return {"seconds": seconds, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024.0}


def recipe(method: str, paths: dict[str, Path], covs: list[Path] | None, k: int, **params) -> str:
    lines = [f"merge_method: {method}", f"base_model: {paths['base']}", "models:"]
    for i in range(k):
        per = {"weight": 1.0, "density": 0.2, **({"covariance": str(covs[i])} if covs else {})}
        lines += [f"  - model: {paths[f'ft{i}']}", "    parameters: " + json.dumps(per)]
    lines += ["parameters: " + json.dumps({"normalize": False, "lambda": 1.0, **params}), "dtype: float32"]
    return "\n".join(lines) + "\n"


def co_svd_seconds(shape: tuple[int, int]) -> float:
    """One float64 CO-SVD of a weight of ``shape`` (median of 2, after a warm-up)."""
    from pave_plugins.core.purify import co_svd, prepare_covariance

    out_f, in_f = shape
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)
    x = torch.randn(2 * in_f, in_f, generator=g, dtype=torch.float64)
    cov = prepare_covariance(x.T @ x)
    del x
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        co_svd(w + 1e-3 * torch.randn(out_f, in_f, generator=g), w, cov)
        times.append(time.perf_counter() - t0)
    return sorted(times)[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="folder for the models, covariance files and merges (~7 GiB)")
    ap.add_argument("--json", required=True, help="results file (rewritten after every step)")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=16384, help="calibration tokens per fine-tune (128 per example)")
    ap.add_argument("--skip-co-svd", action="store_true", help="do not time the single CO-SVDs")
    args = ap.parse_args(argv)
    k, work = 2, Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"layers": args.layers, "k": k, "threads": torch.get_num_threads(), "tokens": args.tokens}

    def save() -> None:
        Path(args.json).write_text(json.dumps(res, indent=1))

    t0 = time.perf_counter()
    paths = build(work, args.layers, k)
    res["build_s"] = time.perf_counter() - t0
    covs = []
    for i in range(k):
        cov = work / f"cov_ft{i}.safetensors"
        if not cov.is_file():
            r = run_measured([str(BIN / "pave"), "collect", "--model", str(paths[f"ft{i}"]), "--data", str(paths["data"]),
                              "--n-samples", str(args.tokens // 128), "--max-length", "128", "--batch-size", "8",
                              "--device", "cpu", "--no-progress", "-o", str(cov)])
            r["tokens_per_s"] = args.tokens / r["seconds"]
            res[f"collect_ft{i}"] = r
            print(f"pave collect ft{i}: {r['seconds']:.0f} s ({r['tokens_per_s']:.0f} tokens/s), peak RSS "
                  f"{r['peak_rss_mib']:.0f} MiB", flush=True)
            save()
        covs.append(cov)
    for name, text in (("ties", recipe("ties", paths, None, k)),
                       ("pave_ties", recipe("pave", paths, covs, k, inner="ties", rho=15 / 16))):
        (work / f"{name}.yaml").write_text(text)
        out = work / f"merged_{name}"
        r = run_measured([str(BIN / "mergekit-yaml"), str(work / f"{name}.yaml"), str(out), "--no-copy-tokenizer",
                          "--quiet"])
        r["per_decoder_layer_s"] = r["seconds"] / args.layers
        res[f"mergekit_{name}"] = r
        print(f"mergekit-yaml {name}: {r['seconds']:.0f} s, peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
        save()
    if not args.skip_co_svd:
        res["co_svd_s"] = {f"{o}x{i}": co_svd_seconds((o, i)) for o, i in sorted(set(LAYER_SHAPES))}
        per_layer = sum(res["co_svd_s"][f"{o}x{i}"] for o, i in LAYER_SHAPES)
        res["projection_32_layers_s"] = 32 * k * per_layer + 32 * res["mergekit_ties"]["per_decoder_layer_s"]
        print(f"CO-SVD float64: {res['co_svd_s']}; 32 layers, K = {k}: {res['projection_32_layers_s'] / 3600:.1f} h "
              f"(32 x {k} x {per_layer:.0f} s + ties)", flush=True)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())

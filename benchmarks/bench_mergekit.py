"""Benchmark: peak RAM and wall time of ``mergekit-yaml`` with ``pave`` (inner ties) versus stock ``ties``.

Builds a synthetic Llama-shaped base model and two fine-tunes (random weights, default hidden 768,
intermediate 2048, 4 layers, vocab 8192: ~45M parameters each, float32) plus one covariance file per
fine-tune, then runs the stock ``mergekit-yaml`` twice in fresh processes on the same models:

* ``ties`` (density 0.5), and
* ``pave`` with ``inner: ties`` (same density, rho 0.9375, spectral allocation, float64 maths).

Peak RAM is the child's maximum resident set size (``wait4`` rusage). Target: pave <= 2x ties.
``--startup`` also measures the start-up cost of the plugin (``python -X importtime``) and the cost
of loading the plugins when ``mergekit.merge_methods`` is imported.

    python benchmarks/bench_mergekit.py [--hidden 768 --intermediate 2048 --layers 4] [--cuda] [--startup]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MERGEKIT_YAML = str(Path(sys.executable).with_name("mergekit-yaml"))


def build_models(root: Path, hidden: int, intermediate: int, layers: int, vocab: int, n_models: int = 2):
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from pave_plugins.io.covariance import CovarianceMetadata, save_covariances

    heads = max(1, hidden // 64)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    base = {k: (torch.randn(s, generator=g) * 0.02 if len(s) == 2 else torch.ones(s)) for k, s in shapes.items()}
    dirs = []
    for j in range(n_models + 1):
        d = root / ("base" if j == 0 else f"ft{j}")
        d.mkdir()
        sd = base if j == 0 else {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
        cfg.save_pretrained(d)
        dirs.append(d)
    covs = []
    for j in range(1, n_models + 1):
        cov, layer_map = {}, {}
        for i in range(layers):
            p = f"model.layers.{i}."
            for key, n_in, names in (
                (f"cov.{i}.attn_in", hidden, ["q_proj", "k_proj", "v_proj"]),
                (f"cov.{i}.o_in", hidden, ["o_proj"]),
                (f"cov.{i}.mlp_in", hidden, ["gate_proj", "up_proj"]),
                (f"cov.{i}.down_in", intermediate, ["down_proj"]),
            ):
                x = torch.randn(n_in + 64, n_in, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n_in, dtype=torch.float64)
                cov[key] = x.T @ x
                for n in names:
                    layer_map[p + ("self_attn." if "proj" in n and n[0] in "qkvo" else "mlp.") + n] = key
        path = root / f"cov{j}.safetensors"
        save_covariances(path, cov, CovarianceMetadata(layer_map=layer_map, model_path=str(dirs[j])))
        covs.append(path)
    n_params = sum(v.numel() for v in base.values())
    return dirs[0], dirs[1:], covs, n_params


def run_measured(config: str, out: Path, extra: list[str]) -> tuple[float, float, str]:
    """Run mergekit-yaml in a fresh process; return (wall seconds, peak RSS MiB, stderr tail)."""
    cfg = out.with_suffix(".yaml")
    cfg.write_text(config)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [MERGEKIT_YAML, str(cfg), str(out), "--no-copy-tokenizer", "--quiet", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"mergekit-yaml failed:\n{stderr[-3000:]}")
    return wall, usage.ru_maxrss / 1024.0, stderr[-500:]


def startup() -> None:
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, check=True)
    line = next((ln for ln in r.stderr.splitlines() if "pave_plugins._mergekit_bootstrap" in ln), None)
    print(f"start-up (python -X importtime): {line.strip() if line else 'bootstrap not imported'}")
    code = (
        "import time,sys; t=time.perf_counter(); import mergekit.merge_methods; "
        "print(time.perf_counter()-t)"
    )
    for label, env in (("with plugins", {}), ("PAVE_PLUGINS_DISABLE=1", {"PAVE_PLUGINS_DISABLE": "1"})):
        times = [
            float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 env={**os.environ, **env}).stdout)
            for _ in range(5)
        ]
        print(f"import mergekit.merge_methods, {label}: median {statistics.median(times) * 1e3:.0f} ms (5 runs)")
    code_pl = (
        "import os; os.environ['PAVE_PLUGINS_DISABLE']='1'; import mergekit.merge_methods, time; "
        "del os.environ['PAVE_PLUGINS_DISABLE']; from pave_plugins._mergekit_bootstrap import load_plugins; "
        "t=time.perf_counter(); n=load_plugins(); print(time.perf_counter()-t, n)"
    )
    out = subprocess.run([sys.executable, "-c", code_pl], capture_output=True, text=True, check=True).stdout.split()
    print(f"loading the plugins (entry points + pave/tsv modules) after mergekit import: {float(out[0]) * 1e3:.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--cuda", action="store_true", help="pass --cuda to mergekit-yaml")
    ap.add_argument("--startup", action="store_true", help="also measure the plugin's start-up cost")
    args = ap.parse_args()
    if args.startup:
        startup()
    with tempfile.TemporaryDirectory(prefix="bench_mergekit_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        base, fts, covs, n_params = build_models(root, args.hidden, args.intermediate, args.layers, args.vocab)
        print(
            f"models: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab {args.vocab}: "
            f"{n_params / 1e6:.1f}M parameters each (float32), 2 fine-tunes; built in {time.perf_counter() - t0:.1f} s"
        )
        extra = ["--cuda"] if args.cuda else []
        models_ties = "\n".join(f"  - model: {d}\n    parameters: {{weight: 1.0}}" for d in fts)
        ties = f"merge_method: ties\nbase_model: {base}\nmodels:\n{models_ties}\nparameters:\n  density: 0.5\ndtype: float32\n"
        models_pave = "\n".join(
            f"  - model: {d}\n    parameters: {{weight: 1.0, covariance: {c}}}" for d, c in zip(fts, covs)
        )
        pave = (
            f"merge_method: pave\nbase_model: {base}\nmodels:\n{models_pave}\n"
            "parameters:\n  inner: ties\n  density: 0.5\n  rho: 0.9375\ndtype: float32\n"
        )
        t_ties, m_ties, _ = run_measured(ties, root / "out_ties", extra)
        t_pave, m_pave, _ = run_measured(pave, root / "out_pave", extra)
        print(f"{'method':<12}{'wall s':>10}{'peak RSS MiB':>16}")
        print(f"{'ties':<12}{t_ties:>10.1f}{m_ties:>16.0f}")
        print(f"{'pave+ties':<12}{t_pave:>10.1f}{m_pave:>16.0f}")
        print(f"pave/ties: time x{t_pave / t_ties:.2f}, peak RAM x{m_pave / m_ties:.2f} (target <= 2x)")


if __name__ == "__main__":
    main()

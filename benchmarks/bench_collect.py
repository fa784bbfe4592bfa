"""Covariance collection vs plain forward passes over the same batches (target: <= 1.25x).

    python benchmarks/bench_collect.py [--hidden 256 --layers 4 --vocab 8000 --batches 6 --batch-size 8 --seq 128]

Builds a small random Llama-style causal LM (no download), makes padded token batches, and times:
plain forward passes; collection with float64 accumulation (default, exact); float32 compute
added into float64 accumulators; float32 throughout. Each timing is the best of ``--repeats`` interleaved runs.
Prints one table with seconds, tokens/s and the ratio to the forward passes.
"""

from __future__ import annotations

import argparse
import time

import torch


def build(hidden: int, layers: int, vocab: int, inter: int | None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter or int(hidden * 8 / 3 // 32 * 32),
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=4096,
    )
    return LlamaForCausalLM(cfg).eval()


def make_batches(n: int, bs: int, seq: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (bs, seq), generator=g)
        lengths = torch.randint(seq // 2, seq + 1, (bs,), generator=g)
        lengths[0] = seq
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--inter", type=int, default=None, help="MLP width (default 8/3 hidden)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from pave_plugins.collect import collect_covariances

    model = build(args.hidden, args.layers, args.vocab, args.inter)
    batches = make_batches(args.batches, args.batch_size, args.seq, args.vocab)
    n_tok = sum(int(b["attention_mask"].sum()) for b in batches)

    @torch.no_grad()
    def forward():
        for b in batches:
            model(**b)

    variants = [
        ("forward passes only", forward),
        ("collect float64 (default)", lambda: collect_covariances(model, batches, progress=False)),
        ("collect f32 compute -> f64 acc", lambda: collect_covariances(
            model, batches, accumulate_dtype=torch.float64, compute_dtype=torch.float32, progress=False)),
        ("collect float32", lambda: collect_covariances(model, batches, accumulate_dtype=torch.float32, progress=False)),
    ]
    for _, fn in variants:  # warm-up
        fn()
    # interleaved repeats, best of each: robust to a machine whose load drifts
    best = {label: float("inf") for label, _ in variants}
    for _ in range(args.repeats):
        for label, fn in variants:
            t0 = time.perf_counter()
            fn()
            best[label] = min(best[label], time.perf_counter() - t0)
    t_fwd = best["forward passes only"]
    rows = list(best.items())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: Llama-style, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {n_params / 1e6:.1f} M params; "
          f"{args.batches} batches of {args.batch_size} x {args.seq} ({n_tok} real tokens); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'':34s} {'seconds':>8s} {'tokens/s':>10s} {'x forward':>10s}")
    for label, t in rows:
        print(f"{label:34s} {t:8.3f} {n_tok / t:10.0f} {t / t_fwd:10.2f}")


if __name__ == "__main__":
    main()

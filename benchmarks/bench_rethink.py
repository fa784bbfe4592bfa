"""LoRA-DV spectral rethinking: one iteration on a small Llama-shaped model, dense path vs LoRA
low-rank fast path.

A randomly initialised LlamaForCausalLM (hidden 512, MLP 1376, 4 layers by default) gets K LoRA
experts (rank r on q, k, v, o, gate, up, down), merged by a weighted sum. The same merge is then
rethought twice on the same calibration batches (random token ids, CE on the next token):

* dense path: the merged model alone (delta = merged - base, a dense SVD per layer);
* fast path:  the LoRA factors (thin QR of the stacked B's and A's + an R x R SVD, R = K r).

Printed: decomposition time, time of one rethinking iteration (decomposition + ``epochs`` passes),
Lambda parameters, and the max |weight difference| between the two results (the dense path also
scales the ~zero singular values beyond rank R, so the difference is small but not round-off).

    python benchmarks/bench_rethink.py                      # defaults
    python benchmarks/bench_rethink.py --layers 2 --epochs 2  # quicker
    python benchmarks/bench_rethink.py --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch

from pave_plugins.core import rethink as rt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256, tie_word_embeddings=False,
    )
    device = torch.device(args.device)
    base = LlamaForCausalLM(cfg).to(device)
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    g = torch.Generator().manual_seed(1)
    weights = [1.0 / args.experts] * args.experts
    low_rank = {}
    for name, p in base.named_parameters():
        if name.endswith(".weight") and any(t in name for t in targets):
            out_f, in_f = p.shape
            bs = [(0.02 * torch.randn(out_f, args.rank, generator=g)).to(device) for _ in range(args.experts)]
            as_ = [(0.02 * torch.randn(args.rank, in_f, generator=g)).to(device) for _ in range(args.experts)]
            low_rank[name] = rt.LowRankDelta(bs, as_, weights)
    merged_state = dict(base_state)
    for name, d in low_rank.items():
        merged_state[name] = base_state[name] + d.dense(torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (args.batches, args.batch_size, args.seq), generator=g)
    batches = [{"input_ids": b.to(device)} for b in ids]

    def loss_fn(forward, batch):
        logits = forward(input_ids=batch["input_ids"]).logits
        return rt.token_loss(logits, batch["input_ids"], "ce", shift=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    results = {}
    for path in ("dense", "low_rank"):
        model = LlamaForCausalLM(cfg).to(device)
        model.load_state_dict(merged_state)
        # decomposition alone
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            for name, d in low_rank.items():
                if path == "dense":
                    rt.decompose_dense(merged_state[name] - base_state[name])
                else:
                    rt.decompose_low_rank(d)
        sync()
        t_dec = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = rt.rethink(
            model, base_state, batches, loss_fn, iterations=1, epochs=args.epochs, lr=5e-3, progress=False,
            layers=list(low_rank) if path == "dense" else [], low_rank=low_rank if path == "low_rank" else None,
        )
        sync()
        t_iter = time.perf_counter() - t0
        n_lam = sum(v.numel() for v in res.lambdas[0].values())
        results[path] = ({k: v.detach().clone() for k, v in model.state_dict().items()}, t_dec, t_iter, n_lam, res.losses[0])
        print(
            f"{path:>8}: decomposition {t_dec:7.3f} s | one iteration ({args.epochs} epochs x {args.batches} batches) "
            f"{t_iter:7.3f} s | Lambda params {n_lam:7d} | loss {res.losses[0][0]:.4f} -> {res.losses[0][-1]:.4f}"
        )
    dense, fast = results["dense"][0], results["low_rank"][0]
    diff = max(float((dense[k] - fast[k]).abs().max()) for k in low_rank)
    change = max(float((fast[k] - merged_state[k]).abs().max()) for k in low_rank)
    print(
        f"layers {len(low_rank)}, experts {args.experts} x rank {args.rank}, device {device}, threads {torch.get_num_threads()}\n"
        f"speed-up decomposition x{results['dense'][1] / results['low_rank'][1]:.1f}, iteration x{results['dense'][2] / results['low_rank'][2]:.1f}\n"
        f"max |W_dense - W_fast| = {diff:.3e} (max change of a weight by rethinking: {change:.3e})"
    )


if __name__ == "__main__":
    main()

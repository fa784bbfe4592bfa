"""``pave collect``: per-layer input covariances of a fine-tuned model on task data (one safetensors file)."""

from __future__ import annotations

import argparse
import logging

from pave_plugins.cli import checks

log = logging.getLogger("pave.collect")

EPILOG = """\
examples:
  pave collect --model /models/ft_task_a --data task_a.jsonl --text-field text \\
      --n-samples 512 --max-length 256 --batch-size 8 --out covs/task_a.safetensors
  pave collect --model /models/base --adapter /adapters/task_b --data b.csv --template "{sentence1} {sentence2}" -o b.safetensors
  pave collect --model ... --data saved_dataset_dir --split train -o c.safetensors
  pave collect --merge part1.safetensors part2.safetensors -o whole.safetensors
  pave collect --check covs/task_a.safetensors --model /models/ft_task_a
  torchrun --no-python --nproc-per-node 4 pave collect --model ... --data ... -o c.safetensors   (data parallel)
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "collect",
        help="collect input covariances C = X^T X of every linear layer (PAVE's C) into a safetensors file",
        description="Feed task data to a fine-tuned model and accumulate C = sum_t x_t x_t^T (float64 by "
        "default) at the input of every linear layer (nn.Linear, GPT-2 Conv1D, PEFT-wrapped base layers), "
        "padding excluded; layers reading the same input (q/k/v, gate/up) share one matrix. Writes one "
        "safetensors file with metadata (model fingerprint, counts, layer map). Also sums files collected "
        "in parts (--merge) and checks a file against a model (--check).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="model directory (transformers checkpoint; its tokenizer is used unless --tokenizer)")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory loaded on --model; the covariances "
                   "are named as in the merged model (merge_and_unload) and fingerprinted on the merged weights")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--data", help="calibration data: .jsonl/.json/.csv/.tsv/.txt/.parquet file, a folder of them, "
                   "or a datasets folder written by save_to_disk")
    p.add_argument("--split", default=None, help="split of a saved DatasetDict (default train), or file stem in a folder")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--text-field", default=None, help="column holding the text (default: 'text', or the only string column)")
    g.add_argument("--template", default=None, help="text built from columns, e.g. '{sentence1} {sentence2}' for pair tasks")
    p.add_argument("--n-samples", type=checks.count_or_all, default=512, help="examples drawn without replacement (default 512; 0 = all)")
    p.add_argument("--seed", type=checks.seed, default=0, help="seed of the sample draw (same seed, same examples)")
    p.add_argument("--max-length", type=checks.positive_int, default=512, help="truncate each example to this many tokens (default 512)")
    p.add_argument("--batch-size", type=checks.positive_int, default=8, help="examples per forward pass (default 8)")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                   help="accumulation dtype of the covariances (default float64; never half precision)")
    p.add_argument("--compute-dtype", choices=["float64", "float32"], default=None,
                   help="dtype of each batch's X^T X before it is added (default: --dtype); float32 is faster, less exact")
    p.add_argument("--device", default="auto", type=checks.device, help="cpu, cuda, cuda:1, ... or auto (cuda when present; "
                   "this rank's GPU under torchrun)")
    p.add_argument("--device-map", default=None, help="passed to from_pretrained, e.g. 'auto' (accelerate) for a model "
                   "that does not fit one device")
    p.add_argument("--model-dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="dtype the model runs in (auto: float32 on CPU, the checkpoint's dtype on GPU)")
    p.add_argument("--accumulate-device", default=None, help="where accumulators live (default: each layer's device; "
                   "'cpu' when the covariances do not fit next to the model)")
    p.add_argument("--layers", default=None, type=checks.regex, help="regular expression: only layers whose name matches")
    p.add_argument("--no-dedupe", action="store_true", help="one matrix per layer even when layers share an input")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-o", "--out", help="output .safetensors file (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing covariance file at -o (once the new one is complete)")
    p.add_argument("--merge", nargs="+", metavar="FILE", default=None,
                   help="sum covariance files collected in parts (same model; counts added) into --out")
    p.add_argument("--check", metavar="FILE", default=None, help="check a covariance file against --model (layer "
                   "names, input sizes, weight fingerprint) and exit")
    p.add_argument("--allow-fingerprint-mismatch", action="store_true",
                   help="--merge/--check: a different weight fingerprint (same shapes) is a warning, not an error")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load a model folder whose weights are a pickle (pytorch_model.bin); default: refused")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.merge:
        from pave_plugins.collect.parts import sum_covariance_files
        from pave_plugins.collect.pipeline import check_output_file

        check_output_file(args.out, {"--merge": args.merge}, overwrite=args.overwrite)
        sum_covariance_files(args.merge, args.out, allow_different_models=args.allow_fingerprint_mismatch,
                             overwrite=args.overwrite)
        print(f"wrote {args.out}")
        return 0
    if args.check:
        from pave_plugins.io.fit import check_covariance_file

        if not args.model:
            raise ValueError("--check needs --model (the model the covariance file is used with)")
        f = check_covariance_file(args.check, args.model, values=True,
                                  on_fingerprint_mismatch="warn" if args.allow_fingerprint_mismatch else "error")
        m = f.metadata
        print(f"{args.check}: OK for {args.model} ({len(m.layer_map)} layers, {m.n_samples} samples, {m.n_tokens} tokens)")
        return 0
    if not args.model or not args.data:
        raise ValueError("give --model and --data (or --merge FILES -o OUT, or --check FILE --model DIR)")
    from pave_plugins.collect.distributed import dist_info
    from pave_plugins.collect.pipeline import collect_to_file

    cs = collect_to_file(
        args.model, args.data, args.out,
        text_field=args.text_field, template=args.template, split=args.split,
        n_samples=args.n_samples or None, seed=args.seed, max_length=args.max_length, batch_size=args.batch_size,
        adapter=args.adapter, tokenizer_path=args.tokenizer,
        accumulate_dtype=args.dtype, compute_dtype=args.compute_dtype,
        device=args.device, device_map=args.device_map, model_dtype=args.model_dtype,
        accumulate_device=args.accumulate_device, layer_filter=args.layers, dedupe=not args.no_dedupe,
        allow_pickle=args.allow_pickle,
        progress=not args.no_progress, overwrite=args.overwrite,
    )
    if dist_info()[0] == 0:
        st = cs.stats
        mem = ", ".join(f"{k[:-4]} {v:.2f} GiB" for k, v in st.items() if k.endswith("_gib")) or "n/a"
        print(
            f"wrote {args.out}: {len(cs.covariances)} covariances for {len(cs.layer_map)} layers, "
            f"{cs.n_samples} samples, {cs.n_tokens} tokens, {st.get('seconds', 0):.1f} s "
            f"({st.get('tokens_per_s', 0):.0f} tokens/s); peak memory: {mem}"
        )
    return 0

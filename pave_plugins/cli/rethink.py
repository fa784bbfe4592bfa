"""``pave rethink``: LoRA-DV spectral rethinking of a merged Hugging Face model (or of a weighted sum
of PEFT LoRA adapters) on a small calibration set, written as a new model folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from pave_plugins.cli import checks


def _pairs(values: list[str] | None, what: str, *, stem_ok: bool = False) -> dict[str, str]:
    """``task=path`` items (or bare paths, named by their stem, when ``stem_ok``)."""
    out: dict[str, str] = {}
    for v in values or []:
        if "=" in v:
            name, path = v.split("=", 1)
        elif stem_ok:
            name, path = Path(v).stem, v
        else:
            raise ValueError(f"{what}: expected TASK=PATH, got {v!r}")
        if not name:
            raise ValueError(f"{what}: empty task name in {v!r}")
        if name in out:
            raise ValueError(f"{what}: task {name!r} given twice")
        out[name] = path
    return out


def add_parser(subparsers) -> argparse.ArgumentParser:
    from pave_plugins.engine.settings import RethinkSettings
    from pave_plugins.rethink.hf import RethinkJob

    p = subparsers.add_parser(
        "rethink",
        help="LoRA-DV spectral rethinking of a merged model (learn singular-value scales on calibration data)",
        description=(
            "LoRA-DV: for every 2-D layer, delta = merged - base = U diag(S) V^T; U, V frozen, learn "
            "Lambda (init 1) in U diag(Lambda*S) V^T on a small calibration set (cross-entropy or "
            "entropy, eq. 14), all layers jointly, T iterations re-decomposing delta. Writes a "
            "loadable HF model folder, the learned Lambda (rethink_lambda.safetensors) and a model card."
        ),
        formatter_class=checks.DefaultsFormatter,
    )
    p.add_argument("--base", required=True, help="pre-trained model folder (theta_pre)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--merged", help="merged model folder (mergekit-yaml output, fusion_bench, pave tools)")
    src.add_argument("--lora", nargs="+", metavar="TASK=DIR", help="PEFT LoRA adapter folders (low-rank fast path)")
    p.add_argument("--lora-weights", nargs="+", type=checks.finite_float, help="merge rule for --lora: weights of the weighted sum (default 1 each)")
    p.add_argument(
        "--calib", nargs="+", required=True, metavar="[TASK=]FILE.jsonl",
        help="one jsonl file per task: text-to-text 'input'/'target'; classifiers 'text' (or --template) and 'label'",
    )
    p.add_argument("--heads", nargs="+", metavar="TASK=DIR", help="sequence classifiers: each task's fine-tuned model (its head is used for that task)")
    # LoRA-DV's settings: one flag per row of their table (help, default and rule declared there)
    checks.add_setting_flags(p, RethinkSettings, types={"samples": checks.count_or_all, "seed": checks.seed},
                             check_when_parsed=True)
    p.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer folder (default: the --merged folder's, else the --base folder's)")
    p.add_argument("--max-length", type=checks.positive_int, default=RethinkJob.max_length,
                   help="tokens per calibration example (a longer one is an error naming its row)")
    p.add_argument("--template", help="python format string over a record, e.g. '{sentence1} [SEP] {sentence2}'")
    p.add_argument("--text-field", default="text", help="record field of a classifier's input text")
    p.add_argument("--label-field", default="label", help="record field of a classifier's label (--loss ce)")
    p.add_argument("--input-field", default="input", help="record field of a text-to-text input")
    p.add_argument("--target-field", default="target", help="record field of a text-to-text target (--loss ce)")
    p.add_argument("--task-type", choices=["auto", "seq-cls", "seq2seq", "causal-lm"], default="auto",
                   help="model kind (auto: from the model's config)")
    p.add_argument("--include-embeddings", action="store_true", help="also rethink input/output embedding matrices")
    p.add_argument("--device", default="auto", type=checks.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--out", required=True, help="output model folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output of pave rethink at --out (once the new one is complete)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load model folders whose weights are a pickle (pytorch_model.bin); default: refused")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from pave_plugins.engine.settings import RethinkSettings
    from pave_plugins.rethink import RethinkJob, run_job

    values = checks.setting_values(args, RethinkSettings)
    values["samples"] = values["samples"] or None  # --samples 0: all
    config = RethinkSettings(**values).config(progress=not args.no_progress)
    job = RethinkJob(
        base=args.base,
        merged=args.merged,
        lora=_pairs(args.lora, "--lora", stem_ok=True) or None,
        lora_weights=args.lora_weights,
        heads=_pairs(args.heads, "--heads") or None,
        calib=_pairs(args.calib, "--calib", stem_ok=True),
        out=args.out,
        config=config,
        task_type=args.task_type,
        tokenizer=args.tokenizer,
        max_length=args.max_length,
        template=args.template,
        text_field=args.text_field,
        label_field=args.label_field,
        input_field=args.input_field,
        target_field=args.target_field,
        include_embeddings=args.include_embeddings,
        device=args.device,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
    )
    recipe = run_job(job)
    print(f"rethought {recipe['layers']} layers ({recipe['changed_layers']} changed); wrote {args.out}")
    return 0

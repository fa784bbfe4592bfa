"""``pave demo``: the built-in example (tiny local models, no downloads)."""

from __future__ import annotations

import argparse

from pave_plugins.cli import checks
from pave_plugins.engine.settings import DEFAULT_RHO, PaveSettings


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="run the built-in example: tiny models fine-tuned, purified (PAVE) and merged",
        description="Build a tiny Llama base and K fine-tunes on toy tasks, collect input "
        "covariances, allocate ranks with Algorithm 1, merge with Task Arithmetic, PAVE + Task "
        "Arithmetic and TSV-M, and print per-task accuracy and the rank allocation.",
    )
    p.add_argument("--tasks", type=int, default=3, help="number of fine-tuned models (default 3)")
    p.add_argument("--steps", type=int, default=60, help="fine-tuning steps per task (default 60)")
    p.add_argument("--rho", type=checks.setting(PaveSettings, "rho"), default=DEFAULT_RHO,
                   help=f"preserved rank ratio of Algorithm 1 (default {DEFAULT_RHO})")
    p.add_argument("--seed", type=checks.seed, default=0, help="seed of the base model, the fine-tunes and the data (default 0)")
    p.add_argument("--out", default=None, help="optional folder to keep everything in (built beside it, moved in "
                   "when complete)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier pave demo folder at --out (only "
                   "one that holds nothing else)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from pave_plugins.hosts import require_host

    require_host("mergekit", "pave demo (it merges with mergekit)")
    from pave_plugins.demo import format_result, run_demo

    if args.out is not None:
        from pave_plugins.io.output import check_output

        check_output(args.out, who="pave demo", overwrite=args.overwrite)  # before the work
    res = run_demo(args.out, num_tasks=args.tasks, steps=args.steps, rho=args.rho, seed=args.seed,
                   overwrite=args.overwrite)
    print(format_result(res))
    return 0

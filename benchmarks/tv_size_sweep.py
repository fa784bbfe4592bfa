"""Task-vector-size sweep: does PAVE's gain over its base merge depend on how large the task vectors are?

Runs ``pave bench`` (the harness, one output folder per length) at several fine-tuning lengths
(``--steps``, default 100 300 1000) with otherwise identical settings, then plots, for every
PAVE+X, the gain over X on the task average (paired bootstrap difference with its 95 % interval)
against the mean ``||tau|| / ||W||`` of the fine-tunes, and writes ``sweep.json`` / ``sweep.md``.
Folders that already hold a finished ``results.json`` are not re-run (fine-tunes are cached too).

    python benchmarks/tv_size_sweep.py --out benchmarks/real/results/tv_sweep --steps 100 300 1000 \\
        --seeds 0 -- --protocol trained-heads --schedule linear --train-embeddings --threads 1 ...
    python benchmarks/tv_size_sweep.py --out benchmarks/real/results/tv_sweep --plot-only

Arguments after ``--`` go to ``pave bench`` unchanged (do not pass ``--steps``, ``--seeds`` or ``--out`` there).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger("tv_size_sweep")


def in_progress(results: dict) -> bool:
    """Whether ``results`` (a ``results.json``) is from a run still going or interrupted: the harness
    rewrites it after every method and marks a seed still running ``"partial"``."""
    return any(s.get("partial") for s in results["per_seed"])


def finished(results: dict, seeds: list[int]) -> bool:
    """Whether ``results`` is a finished run of exactly ``seeds``."""
    return [s["seed"] for s in results["per_seed"]] == seeds and not in_progress(results)


def run_lengths(out: Path, steps: list[int], seeds: list[int], bench_args: list[str]) -> None:
    from pave_plugins.cli import main

    for n in steps:
        folder = out / f"steps{n}"
        res = folder / "results.json"
        if res.is_file() and finished(json.loads(res.read_text()), seeds):
            log.info("steps %d: done already (%s)", n, res)
            continue
        log.info("steps %d -> %s", n, folder)
        main(["bench", *bench_args, "--steps", str(n), "--seeds", *map(str, seeds), "--out", str(folder)])


def collect(out: Path) -> list[dict]:
    """One row per (length, PAVE+X): mean ||tau||/||W||, gain over X with interval and p."""
    rows = []
    for res in sorted(out.glob("steps*/results.json"), key=lambda p: int(p.parent.name[5:])):
        r = json.loads(res.read_text())
        if in_progress(r):
            log.warning("%s: a run still in progress (or interrupted), left out", res)
            continue
        tv = r.get("task_vector_ratio") or {}
        ratio = sum(v["all"] for v in tv.values()) / max(len(tv), 1)
        for key, c in (r.get("significance") or {}).items():
            rows.append({"steps": r["config"]["steps"], "seeds": len(r["per_seed"]), "tv_ratio": ratio,
                         "method": key, "label": r["summary"][key]["label"], "against": c["against"],
                         "base_avg": r["summary"][c["against"]]["avg"], "pave_avg": r["summary"][key]["avg"],
                         **{f"avg_{k}": v for k, v in c["avg"].items()}})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    keys = sorted({r["method"] for r in rows})
    for j, key in enumerate(keys):
        pts = sorted((r for r in rows if r["method"] == key), key=lambda r: r["tv_ratio"])
        x = [r["tv_ratio"] * 1.015 ** (j - (len(keys) - 1) / 2) for r in pts]  # side by side, not on top
        y = [r["avg_diff"] for r in pts]
        err = [[r["avg_diff"] - r["avg_lo"] for r in pts], [r["avg_hi"] - r["avg_diff"] for r in pts]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=pts[0]["label"])
    ax.axhline(0, color="k", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("mean ||τ|| / ||W|| of the fine-tunes (one point per fine-tuning length)")
    ax.set_ylabel("PAVE+X − X, test avg (points, 95 % bootstrap CI)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", nargs="+", type=int, default=[100, 300, 1000])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    if not args.plot_only:
        run_lengths(out, args.steps, args.seeds, [a for a in args.bench_args if a != "--"])
    rows = collect(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    lines = ["| steps | seeds | mean ‖τ‖/‖W‖ | method | X | X avg | PAVE+X avg | diff [95 % CI] | p |", "|" + "---|" * 9]
    lines += [f"| {r['steps']} | {r['seeds']} | {r['tv_ratio']:.4f} | {r['label']} | {r['against']} | {r['base_avg']:.1f} | "
              f"{r['pave_avg']:.1f} | {r['avg_diff']:+.2f} [{r['avg_lo']:+.2f}, {r['avg_hi']:+.2f}] | {r['avg_p']:.3f} |"
              for r in rows]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    if rows:
        plot(rows, out / "sweep.png")
    log.info("wrote %s (%d rows)", out, len(rows))


if __name__ == "__main__":
    main()

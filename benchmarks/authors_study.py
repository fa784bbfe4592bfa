"""Tables of the study "PAVE as its authors ran it" (benchmarks/protocol.md) from ``pave bench``
output folders run with ``--damping ... --rank-granularity layer model``.

    python benchmarks/authors_study.py RUN_DIR [RUN_DIR ...]

For each run (one fine-tuning length, its seeds): PAVE+X against X (paired bootstrap, Holm over all
the run's comparisons) with the grid point chosen on validation; then, per damping and rank
granularity, the validation average at the best rho (what a choice of defaults may use), how often
that setting was chosen, and ``||dW_PAVE - dW|| / ||dW||``; the test average of the same points
is printed only in the last column, marked, never used for a choice.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from pave_plugins.bench.harness import selection_table


def load(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def comparison_table(result: dict) -> str:
    labels = {k: v["label"] for k, v in result["summary"].items()}
    lines = ["| PAVE+X vs X | chosen on validation (rho, damping, granularity; per seed) | avg diff [95 % CI] | p | "
             "p (Holm) | verdict |", "|---|---|---|---|---|---|"]
    for key, comp in result.get("significance", {}).items():
        chosen = "; ".join(f"{s['methods'][key]['hp'].get('rho', 0):.4g}, {s['methods'][key]['hp'].get('damping', 0):g}, "
                           f"{s['methods'][key]['hp'].get('rank_granularity', 'layer')}"
                           for s in result["per_seed"] if key in s["methods"])
        a = comp["avg"]
        verdict = "gain" if a["lo"] > 0 else "loss" if a["hi"] < 0 else "no difference"
        if verdict != "no difference" and a["p_holm"] >= 0.05:
            verdict += " (not after Holm)"
        lines.append(f"| {labels[key]} vs {labels[comp['against']]} | {chosen} | {a['diff']:+.2f} "
                     f"[{a['lo']:+.2f}, {a['hi']:+.2f}] | {a['p']:.3f} | {a['p_holm']:.3f} | {verdict} |")
    return "\n".join(lines) + "\n"


def points(result: dict) -> dict[tuple, dict]:
    """``(label, granularity, damping) -> {"val": [...], "test": [...], "rel": [...], "chosen": n}``
    over seeds: PAVE+X - X on validation and on test at each grid point (best rho of the point)."""
    rows: dict[tuple, dict] = defaultdict(lambda: {"val": [], "test": [], "rel": [], "chosen": 0})
    for seed in result["per_seed"]:
        methods = seed["methods"]
        for key, rec in methods.items():
            if not key.startswith("pave_") or "val_trace" not in rec:
                continue
            base = methods[key.split("_", 3)[3]]
            best: dict[tuple, dict] = {}
            for point in rec["val_trace"]:
                setting = (point["rank_granularity"], point["damping"])
                if setting not in best or point["val_avg"] > best[setting]["val_avg"]:
                    best[setting] = point
            for setting, point in best.items():
                row = rows[(rec["label"], *setting)]
                row["val"].append(point["val_avg"] - statistics.mean(base["val"].values()))
                row["test"].append(point["test_avg"] - base["test_avg"])
                row["rel"].append(point["mean_rel_change"])
                row["chosen"] += (rec["hp"].get("rank_granularity"), rec["hp"].get("damping")) == setting
    return rows


def pivot(rows: dict[tuple, dict], field: str, title: str, fmt: str = "{:+.2f}", marks: bool = True) -> str:
    """One line per (PAVE+X, granularity), one column per damping: the mean over seeds of ``field``."""
    dampings = sorted({k[2] for k in rows})
    lines = [f"| {title} | granularity | " + " | ".join(f"δ={d:g}" for d in dampings) + " |",
             "|---|---|" + "---|" * len(dampings)]
    for label, granularity in dict.fromkeys((k[0], k[1]) for k in rows):
        cells = []
        for d in dampings:
            row = rows.get((label, granularity, d))
            mark = f" ({row['chosen']})" if row and marks and row["chosen"] else ""
            cells.append(fmt.format(statistics.mean(row[field])) + mark if row else "")
        lines.append(f"| {label} | {granularity} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def setting_tables(result: dict) -> str:
    rows = points(result)
    return ("\nValidation, PAVE+X − X (points, mean over seeds; (n) = chosen for n seeds):\n\n"
            + pivot(rows, "val", "PAVE+X")
            + "\nTest, PAVE+X − X at the same points (shown for the size of the selection effect, never used "
              "for a choice):\n\n" + pivot(rows, "test", "PAVE+X")
            + "\n‖ΔW_PAVE − ΔW‖ / ‖ΔW‖ (mean over layers, models and seeds):\n\n"
            + pivot({(k[0].split(" + ")[0], *k[1:]): v for k, v in rows.items() if k[0].endswith("Task Arithmetic")},
                    "rel", "PAVE target", "{:.3f}", marks=False))


def pooled_table(results: list[dict]) -> str:
    """Validation only (what chooses the defaults): PAVE+X − X per target, granularity and damping,
    mean over the runs, the inner methods and the seeds; (n) = times chosen."""
    pooled: dict[tuple, dict] = defaultdict(lambda: {"val": [], "chosen": 0})
    for result in results:
        for (label, granularity, damping), row in points(result).items():
            cell = pooled[(label.split(" + ")[0], granularity, damping)]
            cell["val"] += row["val"]
            cell["chosen"] += row["chosen"]
    return ("\nPooled over the runs, inner methods and seeds — validation, PAVE+X − X (points; (n) = times chosen):\n\n"
            + pivot(pooled, "val", "PAVE target"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="pave bench output folders")
    results = [load(run) for run in parser.parse_args().runs]
    for result in results:
        cfg = result["config"]
        print(f"\n### {cfg['steps']} steps, seeds {[s['seed'] for s in result['per_seed']]} ({cfg['protocol']})\n")
        print(comparison_table(result))
        print(setting_tables(result))
        print(selection_table(result["per_seed"]))
        bases = {k: v["avg"] for k, v in result["summary"].items() if k in ("ta", "ties", "emr")}
        print("X's test average (mean over seeds): " + ", ".join(f"{k} {v:.2f}" for k, v in bases.items()))
    print(pooled_table(results))


if __name__ == "__main__":
    main()

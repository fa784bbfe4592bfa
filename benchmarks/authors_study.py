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


def setting_table(result: dict) -> str:
    """Per (target, base) and per (damping, granularity): mean over seeds of the validation average at
    the best rho, minus X's validation average; times chosen; mean relative change; test (marked)."""
    rows: dict[tuple, dict] = defaultdict(lambda: {"val": [], "test": [], "rel": [], "chosen": 0, "n": 0})
    for seed in result["per_seed"]:
        methods = seed["methods"]
        for key, rec in methods.items():
            if not key.startswith("pave_") or "val_trace" not in rec:
                continue
            base = key.split("_", 3)[3]
            x_val = statistics.mean(methods[base]["val"].values())
            x_test = methods[base]["test_avg"]
            best: dict[tuple, dict] = {}
            for point in rec["val_trace"]:
                setting = (point["damping"], point["rank_granularity"])
                if setting not in best or point["val_avg"] > best[setting]["val_avg"]:
                    best[setting] = point
            for setting, point in best.items():
                row = rows[(rec["label"], *setting)]
                row["val"].append(point["val_avg"] - x_val)
                row["test"].append(point["test_avg"] - x_test)
                row["rel"].append(point["mean_rel_change"])
                row["n"] += 1
                row["chosen"] += (rec["hp"].get("damping"), rec["hp"].get("rank_granularity")) == setting
    lines = ["| PAVE+X | damping | granularity | validation: PAVE+X − X at the best rho (mean over seeds) | chosen "
             "(of seeds) | ‖ΔW_PAVE−ΔW‖/‖ΔW‖ | test: PAVE+X − X (not used for any choice) |",
             "|---|---|---|---|---|---|---|"]
    for (label, damping, granularity), row in rows.items():
        lines.append(f"| {label} | {damping:g} | {granularity} | {statistics.mean(row['val']):+.2f} | "
                     f"{row['chosen']}/{row['n']} | {statistics.mean(row['rel']):.3f} | {statistics.mean(row['test']):+.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="pave bench output folders")
    for run in parser.parse_args().runs:
        result = load(run)
        cfg = result["config"]
        print(f"\n### {cfg['steps']} steps, seeds {[s['seed'] for s in result['per_seed']]} ({cfg['protocol']})\n")
        print(comparison_table(result))
        print(setting_table(result))


if __name__ == "__main__":
    main()

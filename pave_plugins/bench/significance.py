"""Paired bootstrap over test examples: is method B better than method A on the same examples?

Both methods are evaluated on the same test examples of every task (and, with several seeds, the
same examples in every seed). A bootstrap replicate resamples each task's examples with
replacement (stratified by task, the same indices for both methods and for every seed) and takes
the difference of accuracies ``B - A`` in points: per task, and on the average over tasks. The
interval is the percentile interval of the replicates; the two-sided p-value is the smallest
level at which the percentile interval excludes 0, ``min(1, 2 min(P(d* <= 0), P(d* >= 0)))``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _as_array(correct: Sequence[str] | Sequence[Sequence[int]]) -> np.ndarray:
    """Seeds x examples of 0/1 (``"0110..."`` strings or 0/1 sequences)."""
    rows = [np.frombuffer(c.encode(), dtype=np.uint8) - ord("0") if isinstance(c, str) else np.asarray(c)
            for c in correct]
    return np.asarray(rows, dtype=np.float64)


def _interval(boot: np.ndarray, observed: float, level: float) -> dict[str, float]:
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    p = min(1.0, 2.0 * min(float(np.mean(boot <= 0)), float(np.mean(boot >= 0))))
    return {"diff": observed, "lo": float(lo), "hi": float(hi), "p": p}


def paired_bootstrap(a: dict[str, Sequence], b: dict[str, Sequence], *, n_boot: int = 10000, seed: int = 0,
                     level: float = 0.95) -> dict[str, dict[str, float]]:
    """Difference ``B - A`` of test accuracy (points) per task and on the task average.

    ``a[task]``, ``b[task]``: per seed, the per-example correctness of A and B (the same examples
    in the same order). Returns ``{task or "avg": {"diff", "lo", "hi", "p"}}``.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, float]] = {}
    avg_boot = np.zeros(n_boot)
    avg_obs = 0.0
    for task in a:
        xa, xb = _as_array(a[task]), _as_array(b[task])
        if xa.shape != xb.shape or xa.shape[1] == 0:
            raise ValueError(f"{task}: the two methods were not scored on the same examples")
        d = 100.0 * (xb - xa).mean(0)  # per example, averaged over seeds
        n = d.size
        boot = d[rng.integers(0, n, size=(n_boot, n))].mean(1)
        out[task] = _interval(boot, float(d.mean()), level)
        avg_boot += boot / len(a)
        avg_obs += float(d.mean()) / len(a)
    out["avg"] = _interval(avg_boot, avg_obs, level)
    return out


def verdict(ci: dict[str, float]) -> str:
    """``gain`` / ``loss`` when the interval excludes 0, else ``no difference``."""
    return "gain" if ci["lo"] > 0 else "loss" if ci["hi"] < 0 else "no difference"


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of ``p_values`` (family-wise error over all of them): the j-th
    smallest p times ``m - j + 1``, made non-decreasing, capped at 1."""
    order = sorted(p_values, key=lambda k: p_values[k])
    adjusted, running = {}, 0.0
    for j, k in enumerate(order):
        running = max(running, min(1.0, (len(order) - j) * p_values[k]))
        adjusted[k] = running
    return adjusted


def comparisons(per_seed: list[dict], names: list[str], *, n_boot: int = 10000) -> dict[str, dict]:
    """Every PAVE+X (harness and mergekit rows) against its X, over the seeds that have both."""
    keys = list(per_seed[0]["methods"])
    pairs = []
    for k in keys:
        if k.startswith("pave_"):
            pairs.append((k, k.split("_", 3)[3]))
        elif k.startswith("mergekit_pave_"):
            pairs.append((k, "mergekit_ties"))
    out = {}
    for k, ref in pairs:
        seeds = [s["methods"] for s in per_seed if k in s["methods"] and ref in s["methods"]
                 and "test_correct" in s["methods"][k] and "test_correct" in s["methods"][ref]]
        if not seeds:
            continue
        a = {n: [m[ref]["test_correct"][n] for m in seeds] for n in names}
        b = {n: [m[k]["test_correct"][n] for m in seeds] for n in names}
        out[k] = {"against": ref, "n_seeds": len(seeds), **paired_bootstrap(a, b, n_boot=n_boot)}
    for k, p in holm({k: c["avg"]["p"] for k, c in out.items()}).items():  # over every comparison of the run
        out[k]["avg"]["p_holm"] = p
    return out


def markdown(comp: dict[str, dict], labels: dict[str, str], names: list[str]) -> str:
    """The table of :func:`comparisons`: difference [95 % interval] and p per task and on the average."""
    lines = ["| PAVE+X − X (points) | " + " | ".join(names) + f" | avg [95 % CI] | p | p (Holm, {len(comp)} tests) | "
             "verdict |", "|" + "---|" * (len(names) + 5)]
    for k, c in comp.items():
        cells = [f"{c[n]['diff']:+.1f} [{c[n]['lo']:+.1f}, {c[n]['hi']:+.1f}]" for n in names]
        a = c["avg"]
        lines.append(f"| {labels.get(k, k)} vs {labels.get(c['against'], c['against'])} | " + " | ".join(cells)
                     + f" | {a['diff']:+.2f} [{a['lo']:+.2f}, {a['hi']:+.2f}] | {a['p']:.3f} | {a['p_holm']:.3f} | "
                     f"{verdict(a)}{'' if a['p_holm'] < 0.05 or verdict(a) == 'no difference' else ' (not after Holm)'} |")
    return "\n".join(lines) + "\n"

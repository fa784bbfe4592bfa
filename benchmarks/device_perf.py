"""PAVE and TSV-M per layer on any device (CPU or GPU), at LLaMA-7B shapes.

For each layer shape (out x in) and number of models K, on synthetic data made on the device
(base weight ~ N(0, 1/in), task vectors of low rank plus noise at 1e-3 of the weight, input
covariances ``C = X^T X`` of inputs with a log-spaced spectrum so that ``cond(C)`` is about 1e6):

* ``floor``: the unavoidable work of PAVE, one SVD of ``W_ft C`` per model;
* ``pave``: one PAVE engine step (covariance check, CO-SVD per model, Algorithm 1 with
  rho = 15/16, purified task vectors), ``target: weight`` (eq. 6);
* both in float64 and float32, and float32's relative error against float64 on the purified
  task vectors at the same ranks, for ``target: weight`` and ``target: delta``;
* ``tsvm``: our TSV-M (float64 and float32) against FusionBench's
  ``compute_and_sum_svd_mem_reduction`` on the same float32 task matrices (timed), and their
  relative difference, also against FusionBench's algorithm run in float64 (identical output).

Times are wall seconds after a warm-up, synchronised on the device; on a GPU the peak memory is
``torch.cuda.max_memory_allocated`` of each measurement.

    python benchmarks/device_perf.py --device cuda --json perf.json
    python benchmarks/device_perf.py --device cpu --shapes 256x256 256x688 --k 2 --json /dev/null   # dry run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pave_plugins.core.layer import layer_co_svds, purify_layer
from pave_plugins.core.purify import prepare_covariance, purify_from_cosvd
from pave_plugins.core.rank_allocation import allocate_ranks
from pave_plugins.core.tsv import tsv_merge

RHO = 15 / 16


def synthetic_layer(out_f: int, in_f: int, k: int, device: str, seed: int = 0):
    """Base weight, K fine-tuned weights and K covariances (float64, cond ~ 1e6) on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, device=device) / math.sqrt(in_f)
    r = max(1, min(out_f, in_f) // 8)
    fts, covs = [], []
    for _ in range(k):
        low = torch.randn(out_f, r, generator=g, device=device) @ torch.randn(r, in_f, generator=g, device=device)
        tv = low / math.sqrt(r * in_f) + 0.1 * torch.randn(out_f, in_f, generator=g, device=device) / math.sqrt(in_f)
        fts.append(w + 1e-3 * tv)
        spectrum = torch.logspace(0, -3, in_f, device=device, dtype=torch.float64)
        spectrum = spectrum[torch.randperm(in_f, generator=g, device=device)]
        x = torch.randn(2 * in_f, in_f, generator=g, device=device, dtype=torch.float64) * spectrum
        covs.append(x.T @ x)
        del x
    return w, fts, covs


def timed(fn: Callable[[], object], device: str) -> tuple[float, float, object]:
    """Seconds and peak device memory (MiB; 0 on the CPU) of one call, synchronised."""
    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = fn()
    if device != "cpu":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device != "cpu" else 0.0
    return time.perf_counter() - t0, peak, result


def floor(fts, covs, dtype: torch.dtype) -> None:
    for w_ft, c in zip(fts, covs):
        torch.linalg.svd(w_ft.to(dtype) @ c.to(dtype), full_matrices=False)


def pave_step(w, fts, covs, dtype: torch.dtype, target: str = "weight"):
    prepared = [prepare_covariance(c, compute_dtype=dtype) for c in covs]
    return purify_layer(w, fts, prepared, rho=RHO, target=target, compute_dtype=dtype, name="layer")


def float32_error(w, fts, covs, target: str) -> float:
    """Max over models of ``‖ΔW_f32 − ΔW_f64‖ / ‖ΔW_f64‖`` at the float64 ranks (Algorithm 1)."""
    names = [f"model {i}" for i in range(len(fts))]
    errs = []
    d64 = layer_co_svds(w, fts, covs, target=target, compute_dtype=torch.float64, names=names)
    ranks = allocate_ranks({"layer": [d.s for d in d64]}, RHO).ranks["layer"]
    ref = [purify_from_cosvd(d, r).task_vector.double() for d, r in zip(d64, ranks)]
    del d64
    d32 = layer_co_svds(w, fts, [c.float() for c in covs], target=target, compute_dtype=torch.float32, names=names)
    for d, r, x in zip(d32, ranks, ref):
        y = purify_from_cosvd(d, r).task_vector.double()
        errs.append(float((y - x).norm() / x.norm()))
    return max(errs)


def tsvm_rows(w, fts, device: str) -> dict:
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction

    tvs = [f - w for f in fts]
    out = {}
    t, peak, ours = timed(lambda: tsv_merge(tvs, 1.0, compute_dtype=torch.float64), device)
    out["tsvm_ours_f64"] = {"seconds": t, "peak_mib": peak}
    t, peak, ours32 = timed(lambda: tsv_merge(tvs, 1.0, compute_dtype=torch.float32), device)
    out["tsvm_ours_f32"] = {"seconds": t, "peak_mib": peak}
    t, peak, fb = timed(lambda: compute_and_sum_svd_mem_reduction([{"w": x} for x in tvs], accelerator=device)["w"], device)
    out["tsvm_fusionbench"] = {"seconds": t, "peak_mib": peak}
    # identical output: FusionBench's algorithm run in float64 (it keeps a float64 input's dtype)
    fb64 = compute_and_sum_svd_mem_reduction([{"w": x.double()} for x in tvs], accelerator=device)["w"]
    for key, res in (("tsvm_ours_f64", ours), ("tsvm_ours_f32", ours32)):
        out[key]["rel_diff_vs_fusionbench"] = float((res.double() - fb.double()).norm() / fb.double().norm())
        out[key]["rel_diff_vs_fusionbench_f64"] = float((res.double() - fb64).norm() / fb64.norm())
    out["tsvm_fusionbench"]["rel_diff_f32_vs_f64"] = float((fb.double() - fb64).norm() / fb64.norm())
    return out


def measure(shape: tuple[int, int], k: int, device: str, with_error: bool) -> dict:
    w, fts, covs = synthetic_layer(*shape, k, device)
    row: dict = {"shape": list(shape), "k": k, "device": device}
    for name, dtype in (("f64", torch.float64), ("f32", torch.float32)):
        row[f"floor_{name}"] = dict(zip(("seconds", "peak_mib"), timed(lambda: floor(fts, covs, dtype), device)[:2]))
        t, peak, res = timed(lambda: pave_step(w, fts, covs, dtype), device)
        row[f"pave_{name}"] = {"seconds": t, "peak_mib": peak, "ranks": res.ranks, "full_rank": res.full_rank}
        row[f"pave_{name}"]["vs_floor"] = t / row[f"floor_{name}"]["seconds"]
        del res
    if with_error:
        row["f32_error"] = {t: float32_error(w, fts, covs, t) for t in ("weight", "delta")}
    row.update(tsvm_rows(w, fts, device))
    return row


def summary_line(r: dict) -> str:
    s = f"{r['shape'][0]}x{r['shape'][1]} K={r['k']}:"
    for n in ("f64", "f32"):
        s += f" floor {n} {r[f'floor_{n}']['seconds']:.2f} s, PAVE {n} {r[f'pave_{n}']['seconds']:.2f} s " \
             f"({r[f'pave_{n}']['vs_floor']:.2f}x, peak {r[f'pave_{n}']['peak_mib']:.0f} MiB);"
    if "f32_error" in r:
        s += f" f32 error weight {r['f32_error']['weight']:.1e}, delta {r['f32_error']['delta']:.1e};"
    fb = r["tsvm_fusionbench"]["seconds"]
    s += f" TSV-M ours f64 {r['tsvm_ours_f64']['seconds']:.2f} s ({fb / r['tsvm_ours_f64']['seconds']:.1f}x faster, " \
         f"diff {r['tsvm_ours_f64']['rel_diff_vs_fusionbench']:.1e}, vs its f64 run {r['tsvm_ours_f64']['rel_diff_vs_fusionbench_f64']:.1e}), f32 {r['tsvm_ours_f32']['seconds']:.2f} s " \
         f"({fb / r['tsvm_ours_f32']['seconds']:.1f}x, diff {r['tsvm_ours_f32']['rel_diff_vs_fusionbench']:.1e}), " \
         f"FusionBench {fb:.2f} s (peak {r['tsvm_fusionbench']['peak_mib']:.0f} MiB vs ours " \
         f"{r['tsvm_ours_f64']['peak_mib']:.0f})"
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008"], help="OUTxIN layer shapes")
    ap.add_argument("--k", nargs="+", type=int, default=[2, 8], help="numbers of fine-tuned models")
    ap.add_argument("--error-k", type=int, default=2, help="measure float32's error at this K only")
    ap.add_argument("--budget-s", type=float, default=None, help="skip the remaining points after this many seconds")
    ap.add_argument("--json", required=True, help="results file (rewritten after every point)")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 (the default; stated for the record)
    # warm-up: the first LAPACK / cuSOLVER call pays one-off costs
    x = torch.randn(64, 48, dtype=torch.float64, device=args.device)
    torch.linalg.svd(x, full_matrices=False), torch.linalg.qr(x), torch.linalg.eigh(x.T @ x), torch.linalg.cholesky(x.T @ x)
    name = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    rows, t0 = [], time.perf_counter()
    for shape in [tuple(int(v) for v in s.split("x")) for s in args.shapes]:
        for k in args.k:
            if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
                print(f"skipped {shape[0]}x{shape[1]} K={k}: time budget spent", flush=True)
                continue
            rows.append(measure(shape, k, args.device, with_error=k == args.error_k))
            print(summary_line(rows[-1]), flush=True)
            Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1))
            if args.device != "cpu":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Purification of one layer: our path vs the naive path of eq. 6, in one run.

Naive path (as eq. 6 is written): explicit ``torch.linalg.inv(C)``, full SVD of ``W_ft C``,
dense products ``U_r S_r V_r^T C^{-1} - W_base``. It is timed in float64 (so that it gives the
same result as ours) and in float32 (faster, but it cancels catastrophically).
Our path: damping check by Cholesky, QR-reduced SVD for the left singular vectors only, the
residual form ``dW - U_{>r} (U_{>r}^T W_ft)`` (no inverse, no solve), float64.

Usage: python benchmarks/bench_purify.py [--tokens 4096] [--repeats 2] [--shapes 1024x1024 1024x4096]
"""

from __future__ import annotations

import argparse
import time

import torch

from pave_plugins.core.purify import purified_task_vector


def naive(w_ft: torch.Tensor, w_base: torch.Tensor, cov: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w_ft @ cov, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(cov) - w_base


def best_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rho", type=float, default=15 / 16)
    p.add_argument("--shapes", nargs="+", default=["1024x1024", "1024x4096"])
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, tokens {args.tokens}, rho {args.rho}")
    print(f"{'shape (out x in)':>18} {'ours f64 s':>10} {'naive f64 s':>11} {'ratio':>6} "
          f"{'max|diff|/max|dW_PAVE|':>22} {'naive f32 s':>11} {'naive f32 rel err':>17}")
    for shape in args.shapes:
        out_f, in_f = (int(x) for x in shape.split("x"))
        w_base = torch.randn(out_f, in_f, dtype=torch.float64) / in_f**0.5
        w_ft = w_base + 1e-3 * torch.randn(out_f, in_f, dtype=torch.float64) / in_f**0.5
        x = torch.randn(args.tokens, in_f, dtype=torch.float64)
        x = x * torch.logspace(0, 2, in_f, dtype=torch.float64)  # cond(C) ~ 1e4
        cov = x.T @ x
        rank = int(args.rho * min(out_f, in_f))
        t_ours, ours = best_time(lambda: purified_task_vector(w_ft, w_base, cov, rank), args.repeats)
        t_naive, ref = best_time(lambda: naive(w_ft, w_base, cov, rank), args.repeats)
        wf, wb, cf = w_ft.float(), w_base.float(), cov.float()
        t_n32, ref32 = best_time(lambda: naive(wf, wb, cf, rank), args.repeats)
        diff = float((ours - ref).abs().max() / ref.abs().max())
        err32 = float((ref32.double() - ref).norm() / ref.norm())
        print(f"{shape:>18} {t_ours:10.3f} {t_naive:11.3f} {t_naive / t_ours:6.2f} {diff:22.2e} "
              f"{t_n32:11.3f} {err32:17.2e}")


if __name__ == "__main__":
    main()

"""TSV-M: pave_plugins `pave/tsv_m` vs FusionBench's `task_singular_vector` TSVM, one run.

A ViT-B/32-shaped stack (per layer: q, k, v, o 768x768 + biases, MLP 3072x768 and 768x3072 +
biases, two LayerNorms) and 8 fine-tuned models are written to a temporary folder; each method runs
in its own subprocess on a FusionBench BaseModelPool that loads the models from disk on demand (as a
real pool does), and reports the time of ``run(modelpool)`` and the peak RSS of the process
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, imports included; the RSS after imports is printed
too). The parent then checks that both merged models agree (relative error of the merged update).

    python benchmarks/bench_tsvm.py                 # 12 layers, 8 tasks
    python benchmarks/bench_tsvm.py --layers 4      # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

D, FF = 768, 3072


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(D, FF), nn.Linear(FF, D)
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)


class Stack(nn.Module):
    def __init__(self, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(layers))


def load_stack(path: str, layers: int) -> Stack:
    """Model-pool loader (FusionBench instantiates it through ``_target_``)."""
    m = Stack(layers)
    m.load_state_dict(torch.load(path, weights_only=True, mmap=False))
    return m


def make_models(folder: Path, layers: int, tasks: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    base = Stack(layers)
    paths = {"_pretrained_": str(folder / "base.pt")}
    torch.save(base.state_dict(), paths["_pretrained_"])
    for t in range(tasks):
        # task vectors with a decaying spectrum, as real fine-tuning updates have (a flat random
        # spectrum would make the top-k truncation itself ill-posed for any fp32 implementation)
        sd = {}
        for k, v in base.state_dict().items():
            if v.ndim == 2:
                r = min(v.shape)
                decay = torch.logspace(0, -2, r)
                tv = (torch.randn(v.shape[0], r) * decay) @ torch.randn(r, v.shape[1]) / r**0.5
                sd[k] = v + 1e-3 * tv
            else:
                sd[k] = v + 1e-3 * torch.randn_like(v)
        paths[f"task{t}"] = str(folder / f"task{t}.pt")
        torch.save(sd, paths[f"task{t}"])
        del sd
    return paths


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def worker(which: str, folder: Path, layers: int, out: Path) -> None:
    from fusion_bench import BaseModelPool

    if which == "fusionbench":
        from fusion_bench.method import TaskSingularVectorMerging as Algo
    else:
        from pave_plugins.fusion_bench import TSVMerging as Algo
    paths = json.loads((folder / "paths.json").read_text())
    models = {n: {"_target_": "bench_tsvm.load_stack", "path": p, "layers": layers} for n, p in paths.items()}
    pool = BaseModelPool(models)
    algo = Algo(alpha=1.0)
    _ = algo.fabric  # start Fabric before timing, as the CLI does
    rss_before = maxrss_mib()
    t0 = time.perf_counter()
    merged = algo.run(pool)
    seconds = time.perf_counter() - t0
    peak = maxrss_mib()
    torch.save(merged.state_dict(), out)
    print(json.dumps({"method": which, "seconds": seconds, "peak_rss_mib": peak, "rss_after_imports_mib": rss_before}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch default)")
    ap.add_argument("--worker", choices=["fusionbench", "pave_plugins", "make"], help=argparse.SUPPRESS)
    ap.add_argument("--tasks-arg", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == "make":
        (args.dir / "paths.json").write_text(json.dumps(make_models(args.dir, args.layers, args.tasks)))
        return
    if args.worker:
        worker(args.worker, args.dir, args.layers, args.out)
        return

    with tempfile.TemporaryDirectory(prefix="bench_tsvm_") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        # the models are written by a subprocess so that this process stays small: a child's
        # ru_maxrss starts from the parent's RSS at fork, which would otherwise inflate both figures
        subprocess.run([sys.executable, __file__, "--worker", "make", "--dir", str(folder), "--layers",
                        str(args.layers), "--tasks", str(args.tasks)], check=True)
        paths = json.loads((folder / "paths.json").read_text())
        n_params = sum(
            (4 * (D * D + D) + 2 * D * FF + FF + D + 4 * D) for _ in range(args.layers))
        print(f"stack: {args.layers} layers, {n_params / 1e6:.1f} M parameters per model, {args.tasks} tasks "
              f"(models written in {time.perf_counter() - t0:.1f} s); torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, device cpu")
        results = {}
        for which in ("fusionbench", "pave_plugins"):
            out = folder / f"merged_{which}.pt"
            cmd = [sys.executable, __file__, "--worker", which, "--dir", str(folder), "--out", str(out),
                   "--layers", str(args.layers), "--threads", str(args.threads)]
            env = dict(os.environ, PYTHONWARNINGS="ignore")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=folder)
            if proc.returncode != 0:
                sys.exit(f"{which} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
            results[which] = json.loads(line)
        base = torch.load(paths["_pretrained_"], weights_only=True)
        a = torch.load(folder / "merged_fusionbench.pt", weights_only=True)
        b = torch.load(folder / "merged_pave_plugins.pt", weights_only=True)
        num = sum(float(((b[k] - a[k]).double() ** 2).sum()) for k in a)
        den = sum(float(((a[k] - base[k]).double() ** 2).sum()) for k in a)
        worst = max(float((b[k] - a[k]).double().norm() / (a[k] - base[k]).double().norm().clamp_min(1e-30)) for k in a)
        fb, ours = results["fusionbench"], results["pave_plugins"]
        print(f"{'method':<28}{'run() s':>10}{'peak RSS MiB':>15}{'RSS after imports':>20}")
        for name, r in (("FusionBench TSVM", fb), ("pave_plugins pave/tsv_m", ours)):
            print(f"{name:<28}{r['seconds']:>10.2f}{r['peak_rss_mib']:>15.0f}{r['rss_after_imports_mib']:>20.0f}")
        print(f"speed-up {fb['seconds'] / ours['seconds']:.2f}x, peak RSS ratio {ours['peak_rss_mib'] / fb['peak_rss_mib']:.2f} "
              f"(over the RSS after imports: {(ours['peak_rss_mib'] - ours['rss_after_imports_mib']) / max(fb['peak_rss_mib'] - fb['rss_after_imports_mib'], 1):.2f})")
        print(f"merged update, relative error vs FusionBench: {num ** 0.5 / den ** 0.5:.2e} (worst tensor {worst:.2e})")
        # ground truth for layer 0: FusionBench's own algorithm run in float64
        from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction

        keys = [k for k in base if k.startswith("layers.0.") and base[k].ndim == 2]
        fts = [torch.load(p, weights_only=True) for n, p in paths.items() if n != "_pretrained_"]
        tvs = [{k: (ft[k] - base[k]).double() for k in keys} for ft in fts]
        del fts
        ref = compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu")
        for name, merged in (("FusionBench TSVM (float32)", a), ("pave_plugins pave/tsv_m", b)):
            errs = [float(((merged[k] - base[k]).double() - ref[k]).norm() / ref[k].norm()) for k in keys]
            print(f"layer 0 matrices, relative error vs FusionBench's algorithm in float64: {name}: max {max(errs):.2e}")


if __name__ == "__main__":
    main()

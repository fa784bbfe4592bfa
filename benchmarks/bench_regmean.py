"""RegMean: pave_plugins `pave/regmean` vs FusionBench's `RegMeanAlgorithm`, same pool, one run.

A ViT-B/32-shaped stack (per layer: q, k, v, o 768x768 + biases, MLP 3072x768 and 768x3072 +
biases, two LayerNorms), ``--tasks`` fine-tuned models and one covariance file per model (the format
of ``pave collect``: one Gram ``X^T X`` per distinct layer input, q/k/v sharing one, float32, with
token counts) are written to a temporary folder. Each method runs in its own subprocess on a
FusionBench BaseModelPool that loads the models from disk; both get the same Gram matrices:
FusionBench's RegMean through its ``get_regmean_weights`` hook (subclassed to read the files and
divide by the token count, which is what its forward hooks hold), ours from the files. Same
settings: per-token Grams (``gram_weighting: mean``), ``reduce_non_diagonal_ratio`` 0.95
(FusionBench's CLIP default), simple mean elsewhere. Printed: time of ``run(modelpool)`` and peak
RSS of the process (``ru_maxrss``, imports included; the RSS after imports too) and, for layer 0,
each merge against a float64 solve of the same Grams; ours runs twice, with the float64 default and
with ``compute_dtype: float32``.

    python benchmarks/bench_regmean.py                 # 4 layers, 4 tasks
    python benchmarks/bench_regmean.py --layers 12 --tasks 8
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

# the ViT-B/32-shaped stack and on-demand loader of the TSV-M benchmark (this folder is on the path of
# the script and of its worker processes)
from bench_tsvm import FF, D, Stack

INPUTS = {"qkv": ("q_proj", "k_proj", "v_proj"), "out": ("out_proj",), "fc1": ("fc1",), "fc2": ("fc2",)}
RATIO = 0.95
WORKERS = {
    "fusionbench": "FusionBench RegMean (float32 inverse)",
    "pave_plugins": "pave/regmean (float64 Cholesky)",
    "pave_plugins_float32": "pave/regmean compute_dtype float32",
}


def make_models(folder: Path, layers: int, tasks: int, seed: int = 0) -> dict:
    """Base, fine-tunes (small random updates) and one covariance file per fine-tune."""
    from pave_plugins.io.covariance import CovarianceMetadata, save_covariances

    torch.manual_seed(seed)
    base = Stack(layers)
    paths = {"_pretrained_": str(folder / "base.pt")}
    torch.save(base.state_dict(), paths["_pretrained_"])
    for t in range(tasks):
        sd = {k: v + 1e-2 * v.abs().mean() * torch.randn_like(v) for k, v in base.state_dict().items()}
        paths[f"task{t}"] = str(folder / f"task{t}.pt")
        torch.save(sd, paths[f"task{t}"])
        del sd
        covs, layer_map, counts = {}, {}, {}
        for i in range(layers):
            for j, (inp, mods) in enumerate(INPUTS.items()):
                n = FF if inp == "fc2" else D
                tokens = 2 * n
                key = f"cov.{i * len(INPUTS) + j}"
                scales = torch.logspace(0, -1.5, n)[torch.randperm(n)]
                x = torch.randn(tokens, n) * scales + 0.1 * torch.randn(n)
                covs[key] = x.T @ x
                counts[key] = tokens
                layer_map.update({f"layers.{i}.{m}": key for m in mods})
        meta = CovarianceMetadata(layer_map=layer_map, counts=counts, dtype="float32", n_tokens=max(counts.values()))
        save_covariances(folder / f"task{t}.safetensors", covs, meta)
    return paths


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def fusionbench_algorithm(folder: Path):
    """FusionBench's RegMean whose statistics hook returns the files' Grams per token (as its hooks do)."""
    from fusion_bench.method.regmean.regmean import RegMeanAlgorithm

    from pave_plugins.io.covariance import CovarianceFile

    class FileRegMean(RegMeanAlgorithm):
        def get_regmean_weights(self, model_name, model, train_dataset, linear_modules_to_merge):
            cf = CovarianceFile(folder / f"{model_name}.safetensors")
            out, cache = {}, {}
            for name in linear_modules_to_merge:
                key = cf.key_for(name)
                if key not in cache:
                    cache[key] = cf.get(name) / cf.metadata.counts[key]
                out[name] = cache[key]
            return out

    return FileRegMean(num_regmean_examples=0, exclude_param_names_regex=[], reduce_non_diagonal_ratio=RATIO,
                       weight_transpose=True)


def worker(which: str, folder: Path, layers: int, out: Path) -> None:
    from fusion_bench import BaseModelPool

    class Pool(BaseModelPool):  # FusionBench's RegMean asks for a train set it then does not use here
        def load_train_dataset(self, name, *args, **kwargs):
            return None

    paths = json.loads((folder / "paths.json").read_text())
    models = {n: {"_target_": "bench_tsvm.load_stack", "path": p, "layers": layers} for n, p in paths.items()}
    pool = Pool(models)
    if which == "fusionbench":
        algo = fusionbench_algorithm(folder)
    else:
        from pave_plugins.fusion_bench import RegMeanAlgorithm

        covs = {n: str(folder / f"{n}.safetensors") for n in paths if n != "_pretrained_"}
        dtype = "float32" if which.endswith("float32") else "float64"
        algo = RegMeanAlgorithm(covariances=covs, reduce_non_diagonal_ratio=RATIO, gram_weighting="mean",
                                compute_dtype=dtype)
        _ = algo.fabric  # start Fabric before timing, as the CLI does
    rss_before = maxrss_mib()
    t0 = time.perf_counter()
    merged = algo.run(pool)
    seconds = time.perf_counter() - t0
    peak = maxrss_mib()
    torch.save(merged.state_dict(), out)
    print(json.dumps({"method": which, "seconds": seconds, "peak_rss_mib": peak, "rss_after_imports_mib": rss_before}))


def layer0_reference(folder: Path, paths: dict) -> dict:
    """RegMean of layer 0's linear weights from the same float32 Grams, solved in float64 (LU)."""
    from pave_plugins.io.covariance import CovarianceFile

    tasks = [n for n in paths if n != "_pretrained_"]
    fts = [torch.load(paths[n], weights_only=True) for n in tasks]
    cfs = [CovarianceFile(folder / f"{n}.safetensors") for n in tasks]
    ref = {}
    for mods in INPUTS.values():
        for m in mods:
            k = f"layers.0.{m}.weight"
            grams = []
            for cf in cfs:
                g = cf.get(k).double() / cf.metadata.counts[cf.key_for(k)]
                grams.append(RATIO * g + (1 - RATIO) * torch.diag(torch.diagonal(g)))
            ref[k] = torch.linalg.solve(sum(grams), sum(g @ ft[k].double().T for g, ft in zip(grams, fts))).T
    return ref


def run_all(args) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_regmean_") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        # written by a subprocess so that this process stays small (a child's ru_maxrss starts from the
        # parent's RSS at fork)
        subprocess.run([sys.executable, __file__, "--worker", "make", "--dir", str(folder), "--layers",
                        str(args.layers), "--tasks", str(args.tasks)], check=True)
        paths = json.loads((folder / "paths.json").read_text())
        n_params = args.layers * (4 * (D * D + D) + 2 * D * FF + FF + D + 4 * D)
        print(f"stack: {args.layers} layers, {n_params / 1e6:.1f} M parameters per model, {args.tasks} tasks, "
              f"float32 covariance files (models and files written in {time.perf_counter() - t0:.1f} s); "
              f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, device cpu")
        results = {}
        for which in WORKERS:
            out = folder / f"merged_{which}.pt"
            cmd = [sys.executable, __file__, "--worker", which, "--dir", str(folder), "--out", str(out),
                   "--layers", str(args.layers), "--threads", str(args.threads)]
            env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join(
                [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=folder)
            if proc.returncode != 0:
                sys.exit(f"{which} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            results[which] = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
        report(folder, paths, results)


def report(folder: Path, paths: dict, results: dict) -> None:
    merged = {w: torch.load(folder / f"merged_{w}.pt", weights_only=True) for w in WORKERS}
    fb = results["fusionbench"]
    ref = layer0_reference(folder, paths)
    print(f"{'method':<40}{'run() s':>9}{'peak RSS MiB':>14}{'after imports':>15}{'layer-0 error':>15}")
    for w in WORKERS:
        r = results[w]
        err = max(float((merged[w][k].double() - x).norm() / x.norm()) for k, x in ref.items())
        print(f"{WORKERS[w]:<40}{r['seconds']:>9.2f}{r['peak_rss_mib']:>14.0f}{r['rss_after_imports_mib']:>15.0f}{err:>15.2e}")
    for w in ("pave_plugins", "pave_plugins_float32"):
        r = results[w]
        print(f"{WORKERS[w]}: speed-up {fb['seconds'] / r['seconds']:.2f}x, peak RSS ratio "
              f"{r['peak_rss_mib'] / fb['peak_rss_mib']:.2f} (over the RSS after imports: "
              f"{(r['peak_rss_mib'] - r['rss_after_imports_mib']) / max(fb['peak_rss_mib'] - fb['rss_after_imports_mib'], 1):.2f})")
    a, b = merged["fusionbench"], merged["pave_plugins"]
    worst = max(float((b[k] - a[k]).double().norm() / a[k].double().norm()) for k in a)
    print(f"merged weights, worst relative difference ours (float64) vs FusionBench: {worst:.2e}; "
          "layer-0 error: max relative error of layer 0's linear weights vs a float64 LU solve of the same Grams")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch default)")
    ap.add_argument("--worker", choices=[*WORKERS, "make"], help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == "make":
        (args.dir / "paths.json").write_text(json.dumps(make_models(args.dir, args.layers, args.tasks)))
    elif args.worker:
        worker(args.worker, args.dir, args.layers, args.out)
    else:
        run_all(args)


if __name__ == "__main__":
    main()

"""Performance and scaling of the merges, side by side in one run.

Every measurement runs in a fresh subprocess so that its peak RSS (``ru_maxrss``) is its own.
Synthetic models: ``n_layers`` linear layers of one shape, a random base and K fine-tunes
(base + a small task vector of decaying spectrum), random PSD covariances saved to covariance files.

Measured, per (K, shape):

* ``floor``   - the unavoidable work of PAVE: read the K covariance files + K SVDs per layer (float64)
* ``pave_ta`` - PAVE + TA through FusionBench ``pave/pave`` (covariance files, CO-SVD, Algorithm 1,
  purification, inner TA)
* ``ties``    - FusionBench's plain TIES on the same pool
* ``tsvm_ours`` / ``tsvm_fb`` - our TSV-M algorithm vs FusionBench's TaskSingularVectorMerging

and ``collect`` vs ``forward``: covariance collection (pave_plugins.collect) vs plain forward passes
over the same batches of a small random BERT.

    python benchmarks/scaling.py --quick          # ~2-4 minutes on 2 cores
    python benchmarks/scaling.py --threads 1      # K = 2, 4, 8 and shapes up to 4096x11008 (~1 h on one core)
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

from pave_plugins.io.output import output_file


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _pool(k: int, shape: tuple[int, int], n_layers: int, seed: int = 0):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    out_f, in_f = shape

    def make():
        return nn.Sequential(*[nn.Linear(in_f, out_f, bias=False) for _ in range(n_layers)])

    base = make()
    models = {"_pretrained_": base}
    for i in range(k):
        m = make()
        with torch.no_grad():
            for pb, pm in zip(base.parameters(), m.parameters()):
                r = min(out_f, in_f) // 8
                tv = torch.randn(out_f, r) @ torch.randn(r, in_f) / (r ** 0.5) * 1e-3
                pm.copy_(pb + tv)
        models[f"m{i}"] = m
    return models


def _covariances(models, folder: Path):
    import torch

    from pave_plugins.io.covariance import CovarianceMetadata, save_covariances

    if folder.exists():  # shared by the floor and PAVE runs of one grid point (written once)
        return
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    for name, m in models.items():
        if name == "_pretrained_":
            continue
        covs, layer_map = {}, {}
        for i, lin in enumerate(m):
            # twice as many tokens as inputs: full rank, like covariances of real calibration sets
            n_tokens = max(2048, 2 * lin.in_features)
            x = torch.randn(n_tokens, lin.in_features, generator=g) * torch.linspace(0.1, 2.0, lin.in_features)
            covs[f"c{i}"] = (x.T @ x).to(torch.float64)
            layer_map[str(i)] = f"c{i}"
            del x
        save_covariances(tmp / f"{name}.safetensors", covs, CovarianceMetadata(layer_map=layer_map))
    tmp.rename(folder)


def measure(spec: dict) -> dict:
    """One measurement (runs in its own process)."""
    import torch

    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    method, k, shape, n_layers = spec["method"], spec["k"], tuple(spec["shape"]), spec["n_layers"]
    if method in ("collect", "forward"):
        return _measure_collection(spec)
    models = _pool(k, shape, n_layers)
    cov_dir = Path(spec["cov_dir"]) if spec.get("cov_dir") else Path(tempfile.mkdtemp()) / "covs"
    if method in ("floor", "pave_ta"):
        _covariances(models, cov_dir)
    # imports outside the timed region (lightning / fusion_bench start-up is several seconds)
    import fusion_bench.method  # noqa: F401
    from fusion_bench.method.task_singular_vector.TSVM import TaskSingularVectorMerging  # noqa: F401

    import pave_plugins.fusion_bench.pave  # noqa: F401
    import pave_plugins.fusion_bench.tsv  # noqa: F401
    from pave_plugins.io.covariance import CovarianceFile  # noqa: F401

    w = torch.randn(64, 32, dtype=torch.float64)  # warm up LAPACK (first call pays a one-off cost)
    torch.linalg.svd(w, full_matrices=False), torch.linalg.qr(w), torch.linalg.cholesky(w.T @ w)
    rss0 = _rss_mib()
    t0 = time.perf_counter()
    if method == "floor":
        from pave_plugins.io.covariance import CovarianceFile

        base = models["_pretrained_"]
        for name in [n for n in models if n != "_pretrained_"]:
            cf = CovarianceFile(cov_dir / f"{name}.safetensors")
            for i, lin in enumerate(models[name]):
                c = cf.get(str(i)).to(torch.float64)
                torch.linalg.svd(lin.weight.detach().to(torch.float64) @ c, full_matrices=False)
        del base
    elif method == "pave_ta":
        from pave_plugins.fusion_bench.pave import PAVEAlgorithm

        PAVEAlgorithm(inner={"name": "task_arithmetic", "scaling_factor": 0.5}, rho=0.9375,
                      covariances=str(cov_dir), write_model_card=False, inplace=True).run(models)
    elif method == "ties":
        from fusion_bench.method import TiesMergingAlgorithm

        TiesMergingAlgorithm(scaling_factor=0.5, threshold=20, remove_keys=[], merge_func="sum").run(models)
    elif method in ("tsvm_ours", "tsvm_ours32"):
        from pave_plugins.fusion_bench.tsv import TSVMerging

        TSVMerging(alpha=1.0, write_model_card=False,
                   compute_dtype="float32" if method == "tsvm_ours32" else "float64").run(models)
    elif method == "tsvm_fb":
        from fusion_bench import BaseModelPool
        from fusion_bench.method.task_singular_vector.TSVM import TaskSingularVectorMerging

        TaskSingularVectorMerging(alpha=1.0).run(BaseModelPool(models))
    else:
        raise ValueError(method)
    dt = time.perf_counter() - t0
    return {**spec, "seconds": dt, "peak_rss_mib": _rss_mib(), "rss_before_mib": rss0,
            "peak_extra_mib": _rss_mib() - rss0}


def _measure_collection(spec: dict) -> dict:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    h = spec["shape"][0]
    model = BertModel(BertConfig(vocab_size=1000, hidden_size=h, num_hidden_layers=spec["n_layers"],
                                 num_attention_heads=max(1, h // 64), intermediate_size=4 * h)).eval()
    batches = [{"input_ids": torch.randint(5, 1000, (16, 64)), "attention_mask": torch.ones(16, 64, dtype=torch.long)}
               for _ in range(spec["k"])]
    from pave_plugins.collect import collect_covariances  # noqa: F401

    rss0 = _rss_mib()
    t0 = time.perf_counter()
    if spec["method"] == "forward":
        with torch.no_grad():
            for b in batches:
                model(**b)
    else:
        from pave_plugins.collect import collect_covariances

        collect_covariances(model, batches, progress=False)
    dt = time.perf_counter() - t0
    return {**spec, "seconds": dt, "peak_rss_mib": _rss_mib(), "rss_before_mib": rss0, "peak_extra_mib": _rss_mib() - rss0}


def run_child(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        return {**spec, "error": out.stderr[-800:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, K = 2 and 4 (a few minutes)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "real" / "results" / "scaling.json"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--point", action="append", default=[], metavar="K:OUTxIN:LAYERS",
                    help="measure only these grid points (repeatable), e.g. 2:4096x11008:1")
    ap.add_argument("--no-collection", action="store_true", help="skip the collection vs forward rows")
    ap.add_argument("--methods", nargs="+", help="measure only these of floor pave_ta ties tsvm_ours tsvm_ours32 tsvm_fb")
    ap.add_argument("--append", action="store_true", help="keep the rows already in --out (a run in parts)")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    if args.quick:
        grid = [(2, (512, 512), 2), (4, (512, 512), 2), (2, (1024, 1024), 2), (4, (1024, 1024), 2),
                (2, (1024, 2752), 2)]
        coll = [(8, (256, 256), 4)]
    else:
        # growth with K at a mid-size shape (2 layers), then with layer size up to LLaMA-7B's
        # attention (4096x4096, K = 2, 4, 8) and MLP (4096x11008, K = 2) shapes, one layer each:
        # a float64 SVD of 4096x11008 alone takes ~95 s on one core, so the full factorial is days.
        grid = [(k, (1024, 2752), 2) for k in (2, 4, 8)]
        grid += [(2, (1024, 1024), 1)] + [(k, (4096, 4096), 1) for k in (2, 4, 8)] + [(2, (4096, 11008), 1)]
        coll = [(16, (384, 384), 6), (16, (768, 768), 12)]
    if args.point:
        grid = [(int(k), tuple(int(x) for x in shape.split("x")), int(nl))
                for k, shape, nl in (pt.split(":") for pt in args.point)]
    if args.no_collection:
        coll = []
    methods = ["floor", "pave_ta", "ties", "tsvm_ours", "tsvm_ours32", "tsvm_fb"]
    measured = args.methods or methods
    rows = json.loads(Path(args.out).read_text())["rows"] if args.append and Path(args.out).is_file() else []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def add(r: dict) -> None:  # results are written after every measurement: a long run can be cut off
        rows.append(r)
        print(json.dumps({x: r.get(x) for x in ("method", "k", "shape", "n_layers", "seconds", "peak_rss_mib", "error")}),
              flush=True)
        with output_file(args.out, who="benchmarks/scaling.py") as tmp:
            tmp.write_text(json.dumps({"rows": rows, "quick": args.quick, "threads": args.threads}, indent=1))

    for k, shape, n_layers in grid:
        with tempfile.TemporaryDirectory() as work:
            for m in measured:
                add(run_child({"method": m, "k": k, "shape": list(shape), "n_layers": n_layers, "threads": args.threads,
                               "cov_dir": str(Path(work) / "covs")}))
    for nb, shape, nl in coll:
        for m in ("forward", "collect"):
            add(run_child({"method": m, "k": nb, "shape": list(shape), "n_layers": nl, "threads": args.threads}))
    # table
    print("\n| K | layer (out x in) x layers | floor s | PAVE+TA s | PAVE/floor | TIES s | TSV-M ours f64 s (peak MiB) | TSV-M ours f32 s (peak MiB) | TSV-M FusionBench s (peak MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    points = dict.fromkeys((x["k"], tuple(x["shape"]), x["n_layers"]) for x in rows if x.get("method") in methods)
    for k, shape, n_layers in points:
        r = {x["method"]: x for x in rows if x.get("k") == k and tuple(x.get("shape", ())) == shape
             and x.get("n_layers") == n_layers and "seconds" in x}
        if not all(m in r for m in methods):
            continue
        print(f"| {k} | {shape[0]}x{shape[1]} x {n_layers} | {r['floor']['seconds']:.2f} | {r['pave_ta']['seconds']:.2f} | "
              f"{r['pave_ta']['seconds'] / r['floor']['seconds']:.2f} | {r['ties']['seconds']:.2f} | "
              f"{r['tsvm_ours']['seconds']:.2f} ({r['tsvm_ours']['peak_rss_mib']:.0f}) | "
              f"{r['tsvm_ours32']['seconds']:.2f} ({r['tsvm_ours32']['peak_rss_mib']:.0f}) | "
              f"{r['tsvm_fb']['seconds']:.2f} ({r['tsvm_fb']['peak_rss_mib']:.0f}) |")
    for nb, shape, nl in dict.fromkeys((x["k"], tuple(x["shape"]), x["n_layers"]) for x in rows
                                       if x.get("method") in ("forward", "collect")):
        r = {x["method"]: x for x in rows if x.get("method") in ("forward", "collect") and tuple(x["shape"]) == shape}
        if "forward" in r and "collect" in r and "seconds" in r["collect"]:
            print(f"\ncollection vs forward (BERT hidden {shape[0]}, {nl} layers, {nb} batches of 16x64): "
                  f"{r['collect']['seconds']:.2f} s vs {r['forward']['seconds']:.2f} s "
                  f"({r['collect']['seconds'] / r['forward']['seconds']:.2f}x)")


if __name__ == "__main__":
    main()

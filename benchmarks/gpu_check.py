"""GPU self-check: every user path run once on the CPU and once on ``--device``, outputs compared.

Builds tiny Llama models (a word-level tokenizer, a base and two fine-tunes saved as Hugging Face
folders) and calibration data, then runs each user path through its real entry point (the ``pave``
command, the stock ``mergekit-yaml`` and the stock ``fusion_bench``) on the CPU and on the device,
with the same inputs, and compares every output tensor (relative Frobenius difference, the worst
tensor named) against a tolerance per path. One line per path, then a summary; exit 1 if any path
fails or exceeds its tolerance.

    python benchmarks/gpu_check.py --device cuda          # on a GPU machine
    python benchmarks/gpu_check.py --device cpu           # dry run: every path, CPU against CPU

Paths: ``pave collect --device``; ``mergekit-yaml`` with ``--cuda`` (and ``--read-to-gpu``,
``--low-cpu-memory``, ``--async-write``) on a ``pave`` + ``ties`` recipe, a ``pave`` ``target: delta``
+ ``task_arithmetic`` recipe and a ``tsv`` recipe; ``pave purify --device``; ``fusion_bench``
(Fabric on the device against ``fabric.accelerator=cpu``) with ``pave/tsv_m``, ``pave/pave_ties``,
``pave/pave_emr`` and FusionBench's own TSVM; ``pave rethink --device``; and, with ``--bench``,
a ``pave bench`` smoke run (accuracies compared).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
WORDS = (
    "the a an cat dog bird fish runs jumps sleeps eats quickly slowly red blue green big small on under over "
    "house tree river and or not very happy sad good bad today yesterday sentence"
).split()
TASKS = ("task_a", "task_b")
PATHS = ["collect", "mergekit", "purify", "fusion_bench", "rethink"]
MERGEKIT_VARIANTS = {  # name -> flags on the device run (the CPU reference has none)
    "cuda": ["--cuda"],
    "cuda+read-to-gpu": ["--cuda", "--read-to-gpu"],
    "cuda+low-cpu-memory": ["--cuda", "--low-cpu-memory"],
    "cuda+async-write": ["--cuda", "--async-write"],
}
# float64 maths with float32 outputs: CPU and GPU differ by float32 rounding and the order of sums;
# LoRA-DV trains (Adam on the singular-value scales), so its differences compound over the steps
# FusionBench's own TSVM computes in float32 (LAPACK against cuSOLVER: singular vectors of close
# singular values differ at float32 precision over the gap); in a benchmark run
# the evaluation of one model (the zero-shot accuracy) must agree to one test example (0.6-1.25 points)
TOLERANCE = {"collect": 1e-5, "mergekit": 1e-5, "purify": 1e-5, "fusion_bench": 1e-5, "fusion_bench_float32": 1e-3,
             "rethink": 1e-3, "bench": 1.0}


@dataclass
class Check:
    path: str
    tolerance: float
    cpu_cmd: list[str]
    dev_cmd: list[str]
    cpu_out: Path
    dev_out: Path
    rel_diff: float | None = None
    worst: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.rel_diff is not None and self.rel_diff <= self.tolerance


def word_tokenizer(words: list[str]):
    """A word-level fast tokenizer over ``words`` (ids 0-3: pad, unk, bos, eos), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def build_fixture(root: Path, seed: int = 0) -> dict[str, Path]:
    """Tokenizer, base and two fine-tunes (HF folders), calibration jsonl per task."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_tokenizer(WORDS)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(cfg).float().eval()
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    tok.save_pretrained(paths["base"])
    gen = torch.Generator().manual_seed(seed + 1)
    rng = random.Random(seed)
    for t, task in enumerate(TASKS):
        ft = LlamaForCausalLM(cfg).float().eval()
        ft.load_state_dict(base.state_dict())
        with torch.no_grad():  # a low-rank task update plus small noise on every 2-D weight
            for p in ft.parameters():
                if p.ndim == 2:
                    a, b = torch.randn(p.shape[0], 4, generator=gen), torch.randn(4, p.shape[1], generator=gen)
                    p.add_(0.02 * (a @ b) / 2 + 0.002 * torch.randn(p.shape, generator=gen))
        paths[task] = root / task
        ft.save_pretrained(paths[task])
        tok.save_pretrained(paths[task])
        words = WORDS[t * 10:] + WORDS[: t * 10]  # each task favours other words
        rows = []
        for _ in range(48):
            sent = [rng.choice(words[: 20 + rng.randint(0, 10)]) for _ in range(rng.randint(4, 10))]
            rows.append({"text": " ".join(sent), "input": " ".join(sent[:-2]), "target": " ".join(sent[-2:])})
        paths[f"{task}_data"] = root / f"{task}.jsonl"
        paths[f"{task}_data"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def recipe(method: str, paths: dict[str, Path], covs: dict[str, Path] | None, **params) -> str:
    """A mergekit YAML recipe with absolute paths (a relative ``a/b`` is read as a hub id)."""
    lines = [f"merge_method: {method}", f"base_model: {paths['base']}", "models:"]
    for task in TASKS:
        per_model = {"weight": 1.0, **({"density": 0.5} if params.get("inner") == "ties" else {})}
        if covs is not None:
            per_model["covariance"] = str(covs[task])
        lines += [f"  - model: {paths[task]}", "    parameters: " + json.dumps(per_model)]
    lines += ["parameters: " + json.dumps(params), "dtype: float32"]
    return "\n".join(lines) + "\n"


def read_tensors(folder: Path) -> dict[str, "object"]:
    """Every tensor of every ``*.safetensors`` under ``folder``, keyed by relative file and name."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for name, t in load_file(str(f)).items():
            out[f"{f.relative_to(folder)}:{name}"] = t
    return out


def compare_folders(ref: Path, other: Path) -> tuple[float, str]:
    """Max over tensors of ``‖other − ref‖ / ‖ref‖`` (float64), and the worst tensor's name."""
    a, b = read_tensors(ref), read_tensors(other)
    if not a:
        raise RuntimeError(f"no safetensors under {ref}")
    if set(a) != set(b):
        raise RuntimeError(f"different tensors: only CPU {sorted(set(a) - set(b))[:3]}, only device {sorted(set(b) - set(a))[:3]}")
    worst, name = 0.0, ""
    for k, ta in a.items():
        x, y = ta.double(), b[k].double()
        if x.shape != y.shape:
            raise RuntimeError(f"{k}: shape {tuple(x.shape)} on the CPU, {tuple(y.shape)} on the device")
        d = float((x - y).norm() / x.norm().clamp_min(1e-30))
        if d > worst or not name:
            worst, name = d, k
    return worst, name


def run_cmd(cmd: list[str], cwd: Path) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        raise RuntimeError(f"exit {proc.returncode}: {' | '.join(tail)[-600:]}")
    return time.perf_counter() - t0


def collect_checks(paths: dict[str, Path], work: Path, device: str) -> list[Check]:
    checks = []
    for task in TASKS:
        def cmd(dev: str, out: Path) -> list[str]:
            return [str(BIN / "pave"), "collect", "--model", str(paths[task]), "--data", str(paths[f"{task}_data"]),
                    "--n-samples", "32", "--batch-size", "8", "--max-length", "32", "--device", dev, "--no-progress",
                    "-o", str(out / f"{task}.safetensors")]
        cpu, dev = work / "collect_cpu" / task, work / "collect_dev" / task
        checks.append(Check(f"pave collect {task}", TOLERANCE["collect"], cmd("cpu", cpu), cmd(device, dev), cpu, dev))
    return checks


def mergekit_checks(paths: dict[str, Path], covs: dict[str, Path], work: Path, device: str) -> list[Check]:
    recipes = {
        "pave+ties": recipe("pave", paths, covs, inner="ties", rho=0.75, **{"lambda": 1.0}),
        "pave(delta)+task_arithmetic": recipe("pave", paths, covs, inner="task_arithmetic", rho=0.75, target="delta",
                                              **{"lambda": 0.8}),
        "tsv": recipe("tsv", paths, None, alpha=1.0),
    }
    # dry run: the CPU-only flags (--read-to-gpu and --low-cpu-memory need a GPU to mean anything)
    variants = MERGEKIT_VARIANTS if device != "cpu" else {"async-write": ["--async-write"]}
    checks = []
    for name, text in recipes.items():
        slug = name.replace("+", "_").replace("(", "_").replace(")", "")
        rfile = work / f"recipe_{slug}.yaml"
        rfile.write_text(text)
        cpu = work / f"mk_{slug}_cpu"
        base_cmd = [str(BIN / "mergekit-yaml"), str(rfile)]
        for vname, flags in variants.items():
            dev = work / f"mk_{slug}_{vname.replace('+', '_')}"
            checks.append(Check(f"mergekit-yaml {name} {vname}", TOLERANCE["mergekit"],
                                base_cmd + [str(cpu), "--no-copy-tokenizer", "--quiet"],
                                base_cmd + [str(dev), "--no-copy-tokenizer", "--quiet", *flags], cpu, dev))
    return checks


def purify_checks(paths: dict[str, Path], covs: dict[str, Path], work: Path, device: str) -> list[Check]:
    def cmd(dev: str, out: Path) -> list[str]:
        c = [str(BIN / "pave"), "purify", "--base", str(paths["base"]), "--rho", "0.75", "--device", dev, "--out", str(out)]
        for task in TASKS:
            c += ["--model", str(paths[task]), "--covariance", str(covs[task])]
        return c

    cpu, dev = work / "purify_cpu", work / "purify_dev"
    return [Check("pave purify", TOLERANCE["purify"], cmd("cpu", cpu), cmd(device, dev), cpu, dev)]


def fusion_bench_checks(paths: dict[str, Path], covs: dict[str, Path], work: Path, device: str,
                        quick: bool = False) -> list[Check]:
    def hydra_dict(d: dict) -> str:
        return "{" + ",".join(f'{k}:"{v}"' for k, v in d.items()) + "}"

    pool = hydra_dict({"_pretrained_": paths["base"], **{t: paths[t] for t in TASKS}})
    cov_arg = f"method.covariances={hydra_dict(covs)}"
    methods = {
        "pave/tsv_m": ["method=pave/tsv_m"],
        "pave/pave_ties": ["method=pave/pave_ties", "method.rho=0.75", cov_arg],
        "pave/pave_emr": ["method=pave/pave_emr", "method.rho=0.75", cov_arg],
        "FusionBench TSVM": ["method=task_singular_vector/TaskSingularVectorMerging"],
    }
    if quick:  # each fusion_bench start costs seconds: one method, ours with covariance files
        methods = {"pave/pave_ties": methods["pave/pave_ties"]}
    accel = "cpu" if device == "cpu" else "gpu"
    checks = []
    for name, args in methods.items():
        slug = name.replace("/", "_").replace(" ", "_")
        cpu, dev = work / f"fb_{slug}_cpu", work / f"fb_{slug}_dev"

        def cmd(acc: str, out: Path, args=args) -> list[str]:
            return [str(BIN / "fusion_bench"), *args, "modelpool=pave/causal_lm_local", f"modelpool.models={pool}",
                    "~taskpool", f"fabric.accelerator={acc}", "fabric.loggers=null",
                    f"hydra.run.dir={out}_hydra", f'merged_model_save_path="{out}"']

        tol = TOLERANCE["fusion_bench_float32" if name == "FusionBench TSVM" else "fusion_bench"]
        checks.append(Check(f"fusion_bench {name}", tol, cmd("cpu", cpu), cmd(accel, dev), cpu, dev))
    return checks


def rethink_checks(paths: dict[str, Path], merged: Path, work: Path, device: str) -> list[Check]:
    def cmd(dev: str, out: Path) -> list[str]:
        return [str(BIN / "pave"), "rethink", "--base", str(paths["base"]), "--merged", str(merged),
                "--calib", *[f"{t}={paths[f'{t}_data']}" for t in TASKS], "--iterations", "2", "--epochs", "2",
                "--samples", "16", "--max-length", "32", "--device", dev, "--no-progress", "--out", str(out)]

    cpu, dev = work / "rethink_cpu", work / "rethink_dev"
    return [Check("pave rethink", TOLERANCE["rethink"], cmd("cpu", cpu), cmd(device, dev), cpu, dev)]


def run_pair(check: Check, work: Path, references: dict[str, float | str]) -> Check:
    try:
        ref = references[str(check.cpu_out)]
        if isinstance(ref, str):
            raise RuntimeError(f"CPU reference failed: {ref}")
        check.seconds = {"cpu": ref, "device": run_cmd(check.dev_cmd, work)}
        check.rel_diff, check.worst = compare_folders(check.cpu_out, check.dev_out)
    except Exception as exc:  # noqa: BLE001 - reported per path, the run goes on
        check.error = str(exc).splitlines()[0][:600] if str(exc) else type(exc).__name__
    return check


def run_stage(checks: list[Check], work: Path, workers: int) -> list[Check]:
    """CPU references first (one per output folder), then the device runs, ``workers`` at a time."""
    references: dict[str, float | str] = {}

    def reference(c: Check) -> None:
        try:
            references[str(c.cpu_out)] = run_cmd(c.cpu_cmd, work)
        except Exception as exc:  # noqa: BLE001 - reported with each path that needs it
            references[str(c.cpu_out)] = str(exc) or type(exc).__name__

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(reference, {str(c.cpu_out): c for c in checks}.values()))
        return list(pool.map(lambda c: run_pair(c, work, references), checks))


def _run_host_paths(args: argparse.Namespace, work: Path) -> list[Check] | None:
    """Every path but the benchmark; ``None`` when the CPU collection, which they all need, failed."""
    paths = build_fixture(work / "models")
    results = run_stage(collect_checks(paths, work, args.device), work, args.workers)
    covs = {t: work / "collect_cpu" / t / f"{t}.safetensors" for t in TASKS}  # the same inputs on both devices
    if not all(f.is_file() for f in covs.values()):
        print("\n".join(report_line(c) for c in results), flush=True)
        print("pave collect failed on the CPU: nothing else can run", file=sys.stderr)
        return None
    stage = []
    if "mergekit" in args.paths or "rethink" in args.paths:  # rethink starts from the pave+ties merge
        stage += mergekit_checks(paths, covs, work, args.device)
    if "purify" in args.paths:
        stage += purify_checks(paths, covs, work, args.device)
    if "fusion_bench" in args.paths:
        stage += fusion_bench_checks(paths, covs, work, args.device, quick=args.quick)
    results += run_stage(stage, work, args.workers)
    if "rethink" in args.paths:
        results += run_stage(rethink_checks(paths, work / "mk_pave_ties_cpu", work, args.device), work, args.workers)
    return results


def bench_check(work: Path, device: str) -> Check:
    """``pave bench`` smoke run on both devices. Fine-tuning draws its dropout masks from the
    device's random generator, so the fine-tunes (and every merge of them) differ between devices
    like two seeds; what must agree is the evaluation of the same model: the zero-shot accuracy.
    The largest gap over the other methods is reported beside it."""
    model = _bench_model(work / "bench_model")
    data = Path(__file__).resolve().parent / "real" / "data"

    def cmd(dev: str, out: Path) -> list[str]:
        return [str(BIN / "pave"), "bench", "--data", str(data), "--tasks", "sentiment", "dictionary", "--model", model,
                "--out", str(out), "--cache", str(out) + "_cache", "--seeds", "0", "--steps", "40", "--lr", "2e-3",
                "--max-length", "32", "--cov-examples", "64", "--val-per-class", "10", "--test-per-class", "40",
                "--methods", "ta", "pave_delta_spectral", "--ta-grid", "0.5", "1.0", "--rho", "0.9375",
                "--pave-targets", "delta", "--pave-allocations", "spectral", "--pave-bases", "ta", "--device", dev]

    check = Check("pave bench smoke (zero-shot)", TOLERANCE["bench"], cmd("cpu", work / "bench_cpu"),
                  cmd(device, work / "bench_dev"), work / "bench_cpu", work / "bench_dev")
    try:
        check.seconds = {"cpu": run_cmd(check.cpu_cmd, work), "device": run_cmd(check.dev_cmd, work)}
        a = json.loads((check.cpu_out / "results.json").read_text())["summary"]
        b = json.loads((check.dev_out / "results.json").read_text())["summary"]
        if set(a) != set(b):
            raise RuntimeError(f"different methods: {sorted(a)} on the CPU, {sorted(b)} on the device")
        check.rel_diff = abs(a["zero_shot"]["avg"] - b["zero_shot"]["avg"])
        gaps = {m: b[m]["avg"] - a[m]["avg"] for m in a if m != "zero_shot"}
        worst = max(gaps, key=lambda m: abs(gaps[m]))
        check.worst = f"trained: {worst} {gaps[worst]:+.2f} points on the device"
    except Exception as exc:  # noqa: BLE001
        check.error = str(exc).splitlines()[0][:600]
    return check


def _bench_model(folder: Path) -> str:
    """A tiny random BERT with a word-level vocabulary from the committed benchmark data."""
    import re
    from collections import Counter

    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    data = Path(__file__).resolve().parent / "real" / "data"
    words: Counter[str] = Counter()
    labels = []
    for t in ("sentiment", "dictionary"):
        for line in (data / t / "train.jsonl").read_text().splitlines():
            words.update(re.findall(r"\w+|[^\w\s]", json.loads(line)["text"].lower()))
        labels += [w for lab in json.loads((data / t / "labels.json").read_text())["labels"] for w in lab.lower().split()]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(labels) | {w for w, _ in words.most_common(3000)})
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(dict.fromkeys(vocab))}, do_lower_case=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, initializer_range=0.5)
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def report_line(c: Check) -> str:
    if c.error:
        return f"FAIL  {c.path:<52} error: {c.error}"
    status = "ok  " if c.ok else "FAIL"
    unit = "points" if c.path.startswith("pave bench") else "rel"
    secs = f"cpu {c.seconds.get('cpu', 0):5.1f} s, device {c.seconds.get('device', 0):5.1f} s"
    return f"{status}  {c.path:<52} {unit} diff {c.rel_diff:.2e} (tol {c.tolerance:.0e}; worst {c.worst}); {secs}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="device of the runs compared with the CPU (cpu: dry run)")
    ap.add_argument("--work", default=None, help="keep every model and output in this folder (default: a temp dir)")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="commands run at once")
    ap.add_argument("--paths", nargs="+", choices=PATHS + ["bench"], default=PATHS,
                    help="paths to check (default: all but bench; collect always runs when another host path is asked)")
    ap.add_argument("--bench", action="store_true", help="also a `pave bench` smoke run on both devices")
    ap.add_argument("--quick", action="store_true", help="CI-sized: fusion_bench with pave/pave_ties only")
    ap.add_argument("--json", default=None, help="write the per-path results to this JSON file")
    args = ap.parse_args(argv)
    if args.device != "cpu":
        import torch

        if not torch.cuda.is_available():
            print(f"--device {args.device}: torch sees no GPU (use --device cpu for the dry run)", file=sys.stderr)
            return 2
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="pave-gpu-check-")
    work = Path(args.work or tmp.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, work)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp.name, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path) -> int:
    t0 = time.perf_counter()
    results: list[Check] = []
    if set(args.paths) - {"bench"}:
        results = _run_host_paths(args, work)
        if results is None:
            return 1
    if args.bench or "bench" in args.paths:
        results.append(bench_check(work, args.device))
    import torch

    name = torch.cuda.get_device_name() if args.device != "cpu" else "cpu (dry run)"
    print(f"\ndevice: {name}; torch {torch.__version__}")
    for c in results:
        print(report_line(c))
    failed = [c for c in results if not c.ok]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed ({time.perf_counter() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "paths": [
            {"path": c.path, "rel_diff": c.rel_diff, "tolerance": c.tolerance, "worst": c.worst, "seconds": c.seconds,
             "error": c.error, "ok": c.ok} for c in results]}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Fingerprint every output of every face on the demo, to show a restructuring changes none of them.

Runs ``pave demo``, the README's walk-through commands and further cases (every mergekit recipe and
FusionBench method config the demo writes, ``pave purify`` with the other target and allocation, a
``pave bench`` with more methods), then hashes what they wrote: each safetensors tensor by its bytes,
each JSON file with timings and machine-dependent fields dropped, every other file by its bytes.

    python benchmarks/output_fingerprint.py --work /some/empty/dir --json before.json
    (change the code)
    python benchmarks/output_fingerprint.py --work /some/empty/dir --json after.json --compare before.json

Use the same ``--work`` path both times: recipes and cards name their inputs by path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
#: JSON keys whose values are timings or depend on the machine, not on the maths
VOLATILE = re.compile(r"(_s|_seconds|time|timings|date|elapsed|device|host|python|torch|versions?|peak.*|.*_mb|pid)$")
SKIP_PARTS = {".hydra", "lightning_logs", "csv_logs", "tensorboard_logs"}
SKIP_NAMES = {".pave-output.json"}  # the ownership record holds mtimes


def readme_commands() -> list[str]:
    text = README.read_text()
    return [m.group(1).strip() for m in re.finditer(r"<!-- demo -->\n```bash\n(.*?)```", text, re.S)]


def extra_commands(work: Path, demo: str) -> list[str]:
    d = work / demo
    cmds = [f"mergekit-yaml --random-seed 0 {demo}/mergekit/{r.name} {demo}/out/mk_{r.stem}" for r in sorted((d / "mergekit").glob("*.yaml"))]
    for m in sorted((d / "fusion_bench" / "method" / "pave_demo").glob("*.yaml")):
        cmds.append(
            f"fusion_bench --config-dir \"$PWD/{demo}/fusion_bench\" method=pave_demo/{m.stem} modelpool=pave_demo "
            f"'~taskpool' 'merged_model_save_path=\"{{log_dir}}/merged\"' 'path.log_dir={demo}/out/fb_{m.stem}'"
        )
    for inner in ("ties_merging", "emr_merging/emr_merging"):
        tag = inner.split("/")[0]
        cmds.append(
            f"fusion_bench --config-dir \"$PWD/{demo}/fusion_bench\" method=pave_demo/pave_ta modelpool=pave_demo "
            f"method.inner={inner} '~taskpool' 'merged_model_save_path=\"{{log_dir}}/merged\"' "
            f"'path.log_dir={demo}/out/fb_inner_{tag}'"
        )
    models = " ".join(f"--model {demo}/ft_task_{k} --covariance {demo}/covs/task_{k}.safetensors" for k in range(3))
    cmds.append(f"pave purify --base {demo}/base {models} --target delta --rank-allocation uniform --rho 0.8 "
                f"--out {demo}/out/purified_delta_uniform")
    cmds.append(f"pave bench --model {demo}/bench/model --data {demo}/bench/data --tasks colours animals --seeds 0 "
                "--steps 20 --lr 2e-3 --methods ta ties pave_weight_spectral pave_delta_uniform --pave-bases ta ties "
                f"--ta-grid 1.0 --rho 0.9375 0.75 --out {demo}/out/bench_more")
    return cmds


def run_all(work: Path) -> None:
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", XDG_CACHE_HOME=str(work / "cache"))
    demo = "pave-demo"
    cmds = [f"pave demo --out {demo}", *readme_commands()]
    for cmd in cmds:
        _run(cmd, work, env)
    for cmd in extra_commands(work, demo):  # after the demo: they read what it wrote
        _run(cmd, work, env)


def _run(cmd: str, work: Path, env: dict) -> None:
    print("+", cmd.splitlines()[0][:140], flush=True)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {cmd}\n{(proc.stdout + proc.stderr)[-3000:]}")


def scrub(obj):
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items() if not VOLATILE.search(str(k))}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


def fingerprint(root: Path) -> dict[str, str]:
    import torch
    from safetensors import safe_open

    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or SKIP_PARTS & set(path.parts) or path.name in SKIP_NAMES or path.suffix == ".log" or ".tfevents." in path.name:
            continue
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                    out[f"{rel}::{name}"] = f"{hashlib.sha256(raw).hexdigest()} {t.dtype}"
        elif path.suffix == ".json":
            try:
                data = json.loads(path.read_text())
            except ValueError:
                data = path.read_text()
            out[rel] = hashlib.sha256(json.dumps(scrub(data), sort_keys=True).encode()).hexdigest()
        elif path.name == "README.md":  # mergekit lists a recipe's models in set order: compare the lines as a set
            out[rel] = hashlib.sha256("\n".join(sorted(path.read_text().splitlines())).encode()).hexdigest()
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="an empty folder (removed first if it exists)")
    ap.add_argument("--json", type=Path, required=True, help="where to write the fingerprint")
    ap.add_argument("--compare", type=Path, help="an earlier fingerprint: print what differs")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    run_all(args.work)
    fp = fingerprint(args.work / "pave-demo")
    args.json.write_text(json.dumps(fp, indent=1, sort_keys=True))
    n_t = sum("::" in k for k in fp)
    print(f"{len(fp)} entries: {n_t} tensors, {len(fp) - n_t} files")
    if args.compare:
        old = json.loads(args.compare.read_text())
        changed = sorted(k for k in old.keys() & fp.keys() if old[k] != fp[k])
        gone, new = sorted(old.keys() - fp.keys()), sorted(fp.keys() - old.keys())
        for label, keys in (("changed", changed), ("only before", gone), ("only after", new)):
            print(f"{label}: {len(keys)}")
            for k in keys[:40]:
                print("   ", k)
        n_same = len(old.keys() & fp.keys()) - len(changed)
        print(f"identical: {n_same} of {len(old)} (tensors {sum('::' in k for k in old.keys() & fp.keys() if old[k] == fp[k])})")


if __name__ == "__main__":
    main()

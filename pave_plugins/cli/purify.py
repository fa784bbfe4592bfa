"""``pave purify``: write PAVE-purified fine-tuned checkpoints that any merging tool can use.

For every tensor name: one context-oriented SVD per model (PAVE eq. 5), ranks across the given
models by Algorithm 1 (or the uniform baseline), the purified weight ``W_base + dW_PAVE`` (eq. 6);
tensors without a covariance keep the fine-tuned value. One Hugging Face folder per model under
``--out`` (config, tokenizer and other files copied from the fine-tuned folder, weights as
safetensors in the fine-tuned dtype), plus ``pave_rank_report.json``. The output appears
atomically (built in a temporary sibling, then renamed). Merging these folders with mergekit's
``ties`` (or any method) gives exactly the one-step ``merge_method: pave`` with that inner method.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

from pave_plugins.cli import checks
from pave_plugins.engine.report import REPORT_NAME
from pave_plugins.engine.settings import PaveSettings
from pave_plugins.io import strict_json
from pave_plugins.io.output import MANIFEST

logger = logging.getLogger("pave.purify")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
PURIFY_RECORD = "pave_purify.json"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "purify",
        help="write PAVE-purified fine-tuned checkpoints (one HF folder per model)",
        description=checks.plain(__doc__),
        formatter_class=checks.DefaultsFormatter,
    )
    p.add_argument("--base", required=True, type=Path, help="base (pre-trained) model folder")
    p.add_argument("--model", action="append", required=True, type=Path, help="fine-tuned model folder (repeat)")
    p.add_argument(
        "--covariance", action="append", required=True, type=Path, help="covariance file of the preceding --model (repeat)"
    )
    checks.add_setting_flags(p, PaveSettings, exclude=("on_fingerprint_mismatch",))
    p.add_argument("--device", default="cpu", type=checks.device, help="torch device for the maths (e.g. cuda)")
    p.add_argument("--max-shard-size", type=checks.positive_int, default=5 * 10**9, help="bytes per output safetensors shard")
    p.add_argument("--out", required=True, type=Path, help="output folder (one sub-folder per model)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output of pave purify at --out (once the new one is complete)")
    p.add_argument(
        "--allow-fingerprint-mismatch",
        action="store_true",
        help="a covariance file whose model fingerprint differs from its --model is a warning, not an error",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pickle checkpoints (pytorch_model.bin) with torch.load(weights_only=True) when a folder has "
        "no safetensors (default: refused)",
    )
    p.set_defaults(func=run)
    return p


def purify_checkpoints(
    base: Path,
    models: Sequence[Path],
    covariances: Sequence[Path],
    out: Path,
    *,
    device: str = "cpu",
    max_shard_size: int = 5 * 10**9,
    overwrite: bool = False,
    allow_fingerprint_mismatch: bool = False,
    allow_pickle: bool = False,
    **settings: Any,
) -> Path:
    """Write one purified checkpoint per model under ``out`` (see module docstring); returns ``out``.
    ``settings``: :class:`~pave_plugins.engine.PaveSettings` by name (``rho``, ``target``, ...)."""
    import torch

    from pave_plugins.io.covariance import not_a_covariance_file
    from pave_plugins.io.output import check_output

    if len(models) != len(covariances):
        raise ValueError(
            f"give one --covariance per --model (got {len(models)} models and {len(covariances)} covariance files)"
        )
    if not models:
        raise ValueError("give at least one --model")
    if allow_fingerprint_mismatch:
        settings["on_fingerprint_mismatch"] = "warn"
    settings = PaveSettings(**settings)
    check_output(out, who=WHO, inputs=_inputs(base, models, covariances), overwrite=overwrite)  # before any work
    for c in covariances:
        problem = not_a_covariance_file(c)
        if problem:
            raise FileNotFoundError(problem)
    dev = torch.device(device)
    base_ck, cks = _open_checkpoints(base, models, allow_pickle)
    sources = _fitted_sources(models, covariances, cks, settings)
    record = {"inner": None, **settings.to_dict()}
    inputs = _inputs(base, models, covariances)
    report = _write_purified(out, inputs, base_ck, cks, sources, settings, record, dev, max_shard_size, overwrite)
    logger.info("%s\nwrote %s", report.summary().replace("PAVE: purified", "pave purify: purified", 1), out)
    warning = report.final_warning()
    if warning:
        logger.warning("%s", warning)
    return out


WHO = "pave purify"


def _inputs(base: Path, models: Sequence[Path], covariances: Sequence[Path]) -> dict[str, list[Path]]:
    return {"--base": [base], "--model": list(models), "--covariance": list(covariances)}


def _open_checkpoints(base: Path, models: Sequence[Path], allow_pickle: bool):
    """Readers of the base and fine-tuned folders; every fine-tune has exactly the base's tensors."""
    from pave_plugins.io.checkpoints import CheckpointReader

    base_ck = CheckpointReader(base, allow_pickle=allow_pickle)
    cks = [CheckpointReader(m, allow_pickle=allow_pickle) for m in models]
    for ck in cks:
        missing = [n for n in base_ck.names() if n not in ck.where]
        extra = [n for n in ck.where if n not in base_ck.where]
        if missing or extra:
            raise ValueError(
                f"{ck.folder} does not have the base model's tensors "
                f"(missing {missing[:3]}, unexpected {extra[:3]}): models of different architectures?"
            )
    return base_ck, cks


def _fitted_sources(models, covariances, cks, settings) -> list:
    """Open each covariance file and run the fit check against its model (layers, sizes, fingerprint)."""
    from pave_plugins.io.fit import fitted_source

    hint = "pass --allow-fingerprint-mismatch (allow_fingerprint_mismatch=True) to use it anyway"
    return [fitted_source(c, ck.fit_target(), label=str(m), on_fingerprint_mismatch=settings.on_fingerprint_mismatch,
                          mismatch_hint=hint) for m, c, ck in zip(models, covariances, cks)]


def _write_purified(out, inputs, base_ck, cks, sources, settings, record, dev, max_shard_size, overwrite):
    """Build the output folder in a temporary sibling (renamed when complete); returns the report."""
    from pave_plugins.engine import PaveEngine, RankReport, purified_weight
    from pave_plugins.io.checkpoints import ShardedWriter
    from pave_plugins.io.output import distinct_names, output_folder

    models = inputs["--model"]
    labels = [str(Path(m)) for m in models]
    engine = PaveEngine(settings, sources, labels)
    report = RankReport()
    out_names = distinct_names(models, reserved=(REPORT_NAME, MANIFEST))
    report.outputs = dict(zip(out_names, labels))
    report.name_models = lambda _: dict(zip(labels, out_names))  # the report names models as --out does
    with output_folder(out, who=WHO, inputs=inputs, overwrite=overwrite) as tmp:
        writers = [ShardedWriter(tmp / n, max_shard_size=max_shard_size) for n in out_names]

        def read(name: str):
            return base_ck.get(name).to(dev), [ck.get(name).to(dev) for ck in cks]

        def write(name: str, step, w_base, fts) -> None:
            for writer, p, t in zip(writers, step.purifications or [None] * len(fts), fts):
                writer.save_tensor(name, (purified_weight(w_base, p, like=t) if p is not None else t).to("cpu"))

        engine.run(base_ck.names(), read, write, report=report, record=record, progress="pave purify")
        for writer in writers:
            writer.finalize()
        report.finished = True
        _copy_side_files(tmp, inputs, out_names, record, report)
        report.write(tmp / REPORT_NAME)
    return report


def _copy_side_files(tmp: Path, inputs: dict, out_names: list[str], record: dict, report) -> None:
    """Config, tokenizer and other non-weight files of each fine-tune (not its model card), the
    purified model's own card and ``pave_purify.json``."""
    (base,), models = inputs["--base"], inputs["--model"]
    for src, n in zip(models, out_names):
        for f in Path(src).iterdir():
            if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in (*WEIGHT_INDEXES, MANIFEST, CARD):
                shutil.copy2(f, tmp / n / f.name)
        (tmp / n / PURIFY_RECORD).write_text(
            strict_json.dumps({"source": str(src), "base": str(base), **record, "report": f"../{REPORT_NAME}"}, indent=1)
        )
        (tmp / n / CARD).write_text(purified_card(n, src, inputs, out_names, record, report), encoding="utf-8")


CARD = "README.md"


def purified_card(name: str, src: Path, inputs: dict, out_names: Sequence[str], record: dict, report) -> str:
    """The model card of one purified checkpoint: what it was purified from and how, ready to publish."""
    import yaml

    from pave_plugins import cards, papers

    (base,), models, covs = inputs["--base"], inputs["--model"], inputs["--covariance"]
    data = report.to_dict()
    ratio = data["model_ratios"].get(name)
    recipe = {"base": str(base), "models": [{"model": str(m), "covariance": str(c)} for m, c in zip(models, covs)],
              "settings": {k: v for k, v in record.items() if k != "inner"}}
    lines = [
        cards.metadata(cards.hub_ids([src, base]), ["pave", "task-vector-purification"]) + f"# {name}", "",
        f"The fine-tuned model `{cards.folder_name(str(src))}` with PAVE-purified task vectors, written by "
        f"`pave purify` (pave_plugins) against the base `{cards.folder_name(str(base))}`: every linear layer with a "
        "covariance keeps the top-r directions of its context-oriented SVD (eq. 5-6), the ranks chosen across "
        f"the {len(models)} models purified together by {record.get('rank_allocation')} rank allocation. Merge "
        "such folders with any task-vector method (task arithmetic, TIES, ...).", "",
        "## Purification", "",
        f"- preserved rank ratio of this model rho_i: {ratio:.4f}" if ratio is not None else "- nothing purified",
        f"- tensors purified: {data['n_purified']} of {data['n_tensors']} (the others keep the fine-tuned value)",
        f"- models purified together: {', '.join(out_names)}; per-tensor ranks: `../{REPORT_NAME}`", "",
        "## Paper", "", cards.paper_line(papers.PAVE), "",
        "## Recipe", "",
        *cards.recipe_block(yaml.safe_dump(recipe, sort_keys=False), [base, *models, *covs]),
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    purify_checkpoints(
        args.base,
        args.model,
        args.covariance,
        args.out,
        device=args.device,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        allow_fingerprint_mismatch=args.allow_fingerprint_mismatch,
        allow_pickle=args.allow_pickle,
        **checks.setting_values(args, PaveSettings),
    )
    return 0

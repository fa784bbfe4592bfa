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
import json
import logging
import shutil
from pathlib import Path
from typing import Sequence

logger = logging.getLogger("pave.purify")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "purify",
        help="write PAVE-purified fine-tuned checkpoints (one HF folder per model)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", required=True, type=Path, help="base (pre-trained) model folder")
    p.add_argument("--model", action="append", required=True, type=Path, help="fine-tuned model folder (repeat)")
    p.add_argument(
        "--covariance", action="append", required=True, type=Path, help="covariance file of the preceding --model (repeat)"
    )
    p.add_argument("--rho", type=float, default=0.9375, help="preserved rank ratio of Algorithm 1 (default 0.9375)")
    p.add_argument("--gamma", type=float, default=None, help="stopping ratio (default rho - (1 - rho) / 2)")
    p.add_argument("--rank-allocation", choices=("spectral", "uniform"), default="spectral")
    p.add_argument(
        "--target",
        choices=("weight", "delta"),
        default="weight",
        help="'weight': eq. 6 as published (SVD of W_ft C); 'delta': SVD of dW C (base weight untouched)",
    )
    p.add_argument("--compute-dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--device", default="cpu", help="torch device for the maths (e.g. cuda)")
    p.add_argument("--max-shard-size", type=int, default=5 * 10**9, help="bytes per output safetensors shard")
    p.add_argument("--out", required=True, type=Path, help="output folder (one sub-folder per model)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument(
        "--allow-missing-covariance",
        action="store_true",
        help="a layer some models have a covariance for and others lack keeps the plain task vector of the "
        "latter (default: error)",
    )
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


class _Checkpoint:
    """Lazy reader of the safetensors weights of a Hugging Face folder.

    Pickle checkpoints (``pytorch_model.bin``, ``*.pt``) are refused unless ``allow_pickle``; they are
    then read eagerly with ``torch.load(weights_only=True)``.
    """

    def __init__(self, folder: Path, *, allow_pickle: bool = False):
        from safetensors import safe_open

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"model folder not found: {self.folder}")
        files = sorted(self.folder.glob("*.safetensors"))
        self.where: dict[str, Path] = {}
        self.dtypes: dict[str, str] = {}
        self._open: dict[Path, object] = {}
        self._loaded: dict[str, object] | None = None
        if not files:
            pickles = sorted(f for f in self.folder.iterdir() if f.suffix in (".bin", ".pt", ".pth"))
            if pickles and allow_pickle:
                self._load_pickles(pickles)
                return
            hint = (
                f" (found {[f.name for f in pickles[:2]]}: pickle checkpoints are not loaded unless you pass "
                "--allow-pickle (allow_pickle=True); better, re-save with safe_serialization=True)"
                if pickles
                else ""
            )
            raise FileNotFoundError(f"{self.folder}: no .safetensors weights{hint}")
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as st:
                    for k in st.keys():
                        self.where[k] = f
            except Exception as exc:  # SafetensorError, OSError: truncated or corrupt header
                raise ValueError(f"{f}: cannot read safetensors checkpoint (truncated or corrupt?): {exc}") from exc

    def _load_pickles(self, pickles: list[Path]) -> None:
        import torch

        self._loaded = {}
        for f in pickles:
            try:
                sd = torch.load(str(f), map_location="cpu", weights_only=True)
            except Exception as exc:
                raise ValueError(f"{f}: cannot read pickle checkpoint ({exc})") from exc
            if not isinstance(sd, dict):
                raise ValueError(f"{f}: pickle checkpoint does not hold a state dict")
            for k, v in sd.items():
                if torch.is_tensor(v):
                    self._loaded[k] = v
                    self.where[k] = f

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str):
        from safetensors import safe_open

        f = self.where.get(name)
        if f is None:
            raise KeyError(f"{self.folder}: has no tensor {name!r}")
        if self._loaded is not None:
            return self._loaded[name]
        try:
            if f not in self._open:
                self._open[f] = safe_open(str(f), framework="pt", device="cpu")
            return self._open[f].get_tensor(name)  # type: ignore[attr-defined]
        except Exception as exc:  # data section truncated after a valid header
            raise ValueError(f"{f}: cannot read tensor {name!r} (truncated or corrupt file?): {exc}") from exc


def _output_names(models: Sequence[Path]) -> list[str]:
    names, seen = [], {}
    for m in models:
        n = m.resolve().name or "model"
        if n in seen:
            seen[n] += 1
            n = f"{n}_{seen[n]}"
        else:
            seen[n] = 0
        names.append(n)
    return names


def purify_checkpoints(
    base: Path,
    models: Sequence[Path],
    covariances: Sequence[Path],
    out: Path,
    *,
    rho: float = 0.9375,
    gamma: float | None = None,
    rank_allocation: str = "spectral",
    target: str = "weight",
    compute_dtype: str = "float64",
    device: str = "cpu",
    max_shard_size: int = 5 * 10**9,
    overwrite: bool = False,
    allow_missing_covariance: bool = False,
    allow_fingerprint_mismatch: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """Write one purified checkpoint per model under ``out`` (see module docstring); returns ``out``."""
    import torch
    from mergekit.io.tensor_writer import TensorWriter
    from tqdm import tqdm

    from pave_plugins.core.rank_allocation import check_rho_gamma
    from pave_plugins.io.atomic import atomic_directory
    from pave_plugins.mergekit.covariances import CovarianceStore
    from pave_plugins.mergekit.purification import COMPUTE_DTYPES, purify_tensor
    from pave_plugins.mergekit.report import REPORT_NAME, RankReport

    if len(models) != len(covariances):
        raise ValueError(
            f"give one --covariance per --model (got {len(models)} models and {len(covariances)} covariance files)"
        )
    if not models:
        raise ValueError("give at least one --model")
    check_rho_gamma(rho, gamma)
    from pave_plugins.io.atomic import check_writable

    check_writable(Path(out) / "x")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"unknown compute dtype {compute_dtype!r}")
    for c in covariances:
        if not Path(c).is_file():
            raise FileNotFoundError(f"covariance file not found: {c}")
    dev = torch.device(device)
    base_ck = _Checkpoint(base, allow_pickle=allow_pickle)
    cks = [_Checkpoint(m, allow_pickle=allow_pickle) for m in models]
    labels = [str(Path(m)) for m in models]
    base_names = base_ck.names()
    for ck in cks:
        missing = [n for n in base_names if n not in ck.where]
        extra = [n for n in ck.where if n not in base_ck.where]
        if missing or extra:
            raise ValueError(
                f"{ck.folder} does not have the base model's tensors "
                f"(missing {missing[:3]}, unexpected {extra[:3]}): models of different architectures?"
            )
    store = CovarianceStore()
    files = [store.file(lab, str(c), tensor_names=ck.names()) for lab, c, ck in zip(labels, covariances, cks)]
    from pave_plugins.collect.files import check_covariance_file
    from pave_plugins.io.covariance import CovarianceFileError

    for cf, m, ck in zip(files, models, cks):
        # layer input sizes and the model fingerprint written by `pave collect`
        try:
            check_covariance_file(
                cf,
                {n: ck.get(n) for n in ck.names()} if ck._loaded is not None else m,
                on_fingerprint_mismatch="warn" if allow_fingerprint_mismatch else "error",
            )
        except CovarianceFileError as exc:
            msg = str(exc).replace(
                "pass on_fingerprint_mismatch='warn'", "pass --allow-fingerprint-mismatch (allow_fingerprint_mismatch=True)"
            )
            raise CovarianceFileError(f"{msg} (model {m})") from exc
    report = RankReport()
    settings = {
        "inner": None,
        "rho": rho,
        "gamma": gamma,
        "rank_allocation": rank_allocation,
        "target": target,
        "compute_dtype": compute_dtype,
    }
    out_names = _output_names(models)
    cdt = COMPUTE_DTYPES[compute_dtype]
    with atomic_directory(out, overwrite=overwrite) as tmp:
        writers = [
            TensorWriter(str(tmp / n), max_shard_size=max_shard_size, safe_serialization=True) for n in out_names
        ]
        for name in tqdm(base_names, desc="pave purify", unit="tensor"):
            w_base = base_ck.get(name).to(dev)
            fts = [ck.get(name).to(dev) for ck in cks]
            for lab, t in zip(labels, fts):
                if t.shape != w_base.shape:
                    raise ValueError(f"{name}: {lab} has shape {tuple(t.shape)}, base {tuple(w_base.shape)}")
            prepared, keys = [], []
            for cf, t in zip(files, fts):
                layer = cf.resolve(name) if (w_base.ndim == 2 and w_base.is_floating_point()) else None
                if layer is None:
                    prepared.append(None)
                    keys.append(None)
                    continue
                p, key = store.prepared(cf, layer, device=dev, compute_dtype=cdt)
                prepared.append(p)
                keys.append(key)
            if w_base.is_floating_point():
                res = purify_tensor(
                    name,
                    w_base,
                    fts,
                    prepared,
                    labels=labels,
                    rho=rho,
                    gamma=gamma,
                    rank_allocation=rank_allocation,
                    target=target,
                    compute_dtype=cdt,
                    cov_keys=keys,
                    sources=[str(c) for c in covariances],
                    allow_missing_covariance=allow_missing_covariance,
                )
                report.add_tensor(name, res.record, settings)
                outs = [w if w is not None else t for w, t in zip(res.weights, fts)]
            else:
                outs = fts
            for writer, t in zip(writers, outs):
                writer.save_tensor(name, t.to("cpu"), clone=False)
            del w_base, fts, outs, prepared
        for writer in writers:
            writer.finalize()
        for src, n in zip(models, out_names):
            for f in Path(src).iterdir():
                if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in WEIGHT_INDEXES:
                    shutil.copy2(f, tmp / n / f.name)
            (tmp / n / "pave_purify.json").write_text(
                json.dumps(
                    {"source": str(src), "base": str(base), **settings, "report": f"../{REPORT_NAME}"}, indent=1
                )
            )
        report.finished = True
        report.write(tmp / REPORT_NAME)
    logger.info("%s\nwrote %s", report.summary().replace("PAVE: purified", "pave purify: purified", 1), out)
    return out


def run(args: argparse.Namespace) -> int:
    purify_checkpoints(
        args.base,
        args.model,
        args.covariance,
        args.out,
        rho=args.rho,
        gamma=args.gamma,
        rank_allocation=args.rank_allocation,
        target=args.target,
        compute_dtype=args.compute_dtype,
        device=args.device,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        allow_missing_covariance=args.allow_missing_covariance,
        allow_fingerprint_mismatch=args.allow_fingerprint_mismatch,
        allow_pickle=args.allow_pickle,
    )
    return 0

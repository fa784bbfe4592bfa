"""FusionBench algorithm ``pave/rethink``: LoRA-DV spectral rethinking (eq. 8-14) after ANY
FusionBench merging method.

The inner method (``task_arithmetic``, ``ties_merging``, ``dare/task_arithmetic``, ``pave/tsv_m``,
``pave/pave_ta``, ...) merges the pool; then, for every 2-D layer of the merged model, the difference
vector to the pre-trained model is decomposed (``U Sigma V^T``), ``U`` and ``V`` frozen, and an
anisotropic scale ``Lambda`` of the singular values is learned on the pool's validation data
(``n_samples`` per task, 32 as in the paper), cross-entropy (``loss: ce``) or entropy of the
predictions (``loss: entropy``, eq. 14), all layers jointly, ``iterations`` times. The maths lives
in :mod:`pave_plugins.core.rethink`; this module only turns the pool's datasets into batches and
batches into losses.

Batches: Hugging Face style dicts (``input_ids``, ``attention_mask``, optional ``labels``) for
sequence classifiers, seq2seq (e.g. Flan-T5 GLUE pools) and causal LMs; ``(inputs, labels)`` pairs
for plain classifiers. Override :meth:`SpectralRethinking.compute_loss` for other model kinds
(e.g. CLIP with zero-shot heads).
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from fusion_bench import BaseAlgorithm, BaseModelPool
from fusion_bench.mixins import LightningFabricMixin, SimpleProfilerMixin, auto_register_config
from torch import Tensor, nn

from pave_plugins import papers
from pave_plugins.collect.data import ensure_pad_token, seeded_subset
from pave_plugins.core import rethink as core
from pave_plugins.engine.settings import RethinkSettings, settings_for
from pave_plugins.rethink.losses import NEEDS_LABELS, batch_loss
from pave_plugins.rethink.output import save_lambdas
from pave_plugins.rethink.progress import tqdm_bar

from .boundary import one_line_errors
from .methods import inner_method_config, run_inner_method
from .outputs import (
    algorithm_log_dir,
    check_run_outputs,
    inner_tags,
    pool_tokenizer,
    program_config_yaml,
    program_save_path,
    save_tokenizer_with_model,
    write_json,
    write_model_card,
)
from .pool import POOL_SPLITS, checked_pool, padding_collate, pool_inputs, pool_split

log = logging.getLogger(__name__)
_D = RethinkSettings()



class RethinkConfigError(ValueError):
    """Bad parameter of ``pave/rethink``."""


@auto_register_config
class SpectralRethinking(SimpleProfilerMixin, LightningFabricMixin, BaseAlgorithm):
    """LoRA-DV spectral rethinking around any FusionBench merging method.

    Args:
        inner: the merging method: a FusionBench method config name, a dict with ``_target_``,
            or a dict with ``name`` plus overrides (as ``pave/pave``'s ``inner``).
        loss: ``ce`` (needs labels in the data) or ``entropy`` (eq. 14, no labels).
        iterations, epochs, lr: T, epochs per iteration, Adam learning rate (paper: 3, 10, 5e-3;
            LLMs lr 1e-4 and 5 epochs).
        n_samples: calibration samples per task (seeded random subset of the split).
        batch_size: calibration batch size (batches never mix tasks).
        calibration_split: which datasets of the pool: ``val`` (paper), ``train`` or ``test``.
        calibration: jsonl files instead of the pool's datasets, as ``pave rethink --calib``: one file,
            a list (each task named by its file's stem) or ``{task: file}``; records as ``template``
            or ``text_field``/``label_field`` (classifiers), ``input_field``/``target_field``
            (text-to-text), at most ``max_length`` tokens; needs the pool's tokenizer. Every file is
            read and checked before the inner method merges.
        mode: ``anisotropic`` (paper), ``scalar`` (one scale per layer) or ``random`` (Table 4).
        top_k, keep_tail, redecompose, compute_dtype: see :class:`pave_plugins.core.rethink.RethinkConfig`.
        include_embeddings: also rethink ``nn.Embedding`` weights (off: only linear-type layers).
        exclude_keys: parameter names (substrings) never rethought, e.g. task heads.
        seed: calibration subset, batch order and random Lambda.
        lambda_save_path: safetensors of the learned Lambda (default ``<log_dir>/rethink_lambda.safetensors``).
        report_path: JSON report (default ``<log_dir>/rethink_report.json``).
        write_model_card: README.md beside the saved merged model (method, paper, Hydra config).
    """

    def __init__(
        self,
        inner: Any = "task_arithmetic",
        loss: str = _D.loss,
        iterations: int = _D.iterations,
        epochs: int = _D.epochs,
        lr: float = _D.lr,
        n_samples: int = _D.samples,
        batch_size: int = _D.batch_size,
        calibration_split: str = "val",
        calibration: Any = None,
        template: str | None = None,
        text_field: str = "text",
        label_field: str = "label",
        input_field: str = "input",
        target_field: str = "target",
        max_length: int = 256,
        mode: str = _D.mode,
        top_k: int | None = _D.top_k,
        keep_tail: bool = _D.keep_tail,
        redecompose: str = _D.redecompose,
        compute_dtype: str = _D.compute_dtype,
        include_embeddings: bool = False,
        exclude_keys: list[str] | None = None,
        seed: int = _D.seed,
        lambda_save_path: str | None = None,
        report_path: str | None = None,
        write_model_card: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if calibration_split not in POOL_SPLITS:
            raise RethinkConfigError(f"rethink: calibration_split must be one of {POOL_SPLITS}, got {calibration_split!r}")
        try:  # LoRA-DV's settings by their one declaration (auto_register_config set them as attributes)
            self._core_cfg = settings_for(RethinkSettings, functools.partial(getattr, self), "fusion_bench").config()
        except (TypeError, ValueError) as exc:
            raise RethinkConfigError(f"rethink: {str(exc).replace('samples', 'n_samples', 1)}") from exc
        self._inner_cfg = inner_method_config(inner)
        self.last_result: core.RethinkResult | None = None
        self.last_report: dict | None = None

    # ------------------------------------------------------------------ run
    @one_line_errors
    def run(self, modelpool: BaseModelPool | dict[str, nn.Module]):
        modelpool = checked_pool(modelpool, "rethink", RethinkConfigError, need_models=False)
        calib = self._calibration_files()
        self._run_inputs = pool_inputs(modelpool, **{"method.calibration": list(calib.values())})
        try:
            check_run_outputs(self, self._run_inputs, report_path=self.report_path,
                              lambda_save_path=self.lambda_save_path)
        except OSError as exc:
            raise RethinkConfigError(f"rethink: {exc}") from exc
        names = list(modelpool.model_names)
        t0 = time.perf_counter()
        # theta_pre first: TA / TIES / TSV-M may change the pool's pretrained model in place
        with self.profile("load base"), torch.no_grad():
            base = modelpool.load_pretrained_model()
            base_state = {k: v.detach().clone() for k, v in base.state_dict().items() if v.ndim == 2}
            config = getattr(base, "config", None)
            del base
        # the calibration data read and checked before the (long) inner merge
        batches = self._file_batches(modelpool, calib, config) if calib else self._calibration_batches(modelpool, names)
        with self.profile("inner method"):
            merged = self._run_inner(modelpool)
        if not isinstance(merged, nn.Module):
            raise RethinkConfigError(
                f"rethink: the inner method {self._inner_cfg._target_} returned {type(merged).__name__}, not one "
                "merged torch module (methods with per-task modulators such as EMR cannot be rethought)"
            )
        t_inner = time.perf_counter() - t0
        device = self.fabric.device
        before = next(merged.parameters()).device
        merged.to(device)
        layers = self._layers(merged, base_state)
        loss_fn = self._loss_fn(merged, device)
        t1 = time.perf_counter()
        with self.profile("spectral rethinking"):
            result = core.rethink(merged, base_state, batches, loss_fn, layers=layers, config=self._core_cfg,
                                      progress_bar=tqdm_bar)
        t_rethink = time.perf_counter() - t1
        merged.to(before)
        self.last_result = result
        self._finish(result, names, {"inner_s": t_inner, "rethink_s": t_rethink})
        return merged

    def _run_inner(self, pool: BaseModelPool):
        log.info("rethink: running inner method %s", self._inner_cfg._target_)
        return run_inner_method(self._inner_cfg, pool, fabric=self._fabric_instance)

    # ----------------------------------------------------------------- data
    def _calibration_batches(self, modelpool: BaseModelPool, names: list[str]) -> list[Any]:
        split = self.calibration_split
        available, loader = pool_split(modelpool, split)
        tasks = [n for n in names if n in available] or list(available)
        if not tasks:
            raise RethinkConfigError(
                f"rethink: the model pool has no {split} datasets (calibration_split={split!r}); add "
                f"{split}_datasets with one entry per task, or choose another calibration_split"
            )
        missing = [n for n in names if n not in available]
        if missing:
            log.warning("rethink: no %s dataset for model(s) %s; calibrating on %s", split, missing, tasks)
        collate = padding_collate(modelpool)
        g = torch.Generator().manual_seed(int(self.seed))
        batches = []
        for task in tasks:
            dataset = loader(task)
            idx = seeded_subset(len(dataset), int(self.n_samples), g)
            n = len(idx)
            subset = torch.utils.data.Subset(dataset, idx)
            for batch in torch.utils.data.DataLoader(subset, batch_size=int(self.batch_size), shuffle=False, collate_fn=collate):
                batches.append((task, batch))
            log.info("rethink: %d calibration samples of task %s (%s split)", n, task, split)
        return batches

    def _calibration_files(self) -> dict[str, str]:
        """``{task: file}`` of ``calibration`` (empty: the pool's datasets), each an existing file."""
        from pave_plugins.rethink.hf import calibration_files

        try:
            calib = calibration_files(self.calibration, "method.calibration") if self.calibration else {}
        except ValueError as exc:
            raise RethinkConfigError(f"rethink: {exc}") from exc
        for task, path in calib.items():
            if not Path(path).is_file():
                raise RethinkConfigError(f"rethink: method.calibration: no file {path} (task {task})")
        return calib

    def _file_batches(self, modelpool: BaseModelPool, calib: Mapping[str, str], config) -> list[Any]:
        """The batches of the calibration files (``pave rethink``'s reading), with the pool's tokenizer."""
        from pave_plugins.rethink.hf import CalibrationFields, calibration_batches, model_kind

        if not pool_tokenizer(modelpool):
            raise RethinkConfigError("rethink: method.calibration needs the pool's tokenizer: set modelpool.tokenizer")
        fields = CalibrationFields(template=self.template, text_field=self.text_field, label_field=self.label_field,
                                   input_field=self.input_field, target_field=self.target_field,
                                   max_length=int(self.max_length), entropy_hint="method.loss=entropy")
        try:
            kind = model_kind(config)
            label2id = getattr(config, "label2id", None)
            batches, used = calibration_batches(calib, ensure_pad_token(modelpool.load_tokenizer()), kind, config,
                                                self._core_cfg, fields, {t: label2id for t in calib})
        except (OSError, ValueError) as exc:
            raise RethinkConfigError(f"rethink: method.calibration: {exc}") from exc
        log.info("rethink: calibration samples per task from files: %s", used)
        return [(b.pop("task"), b) for b in batches]

    def _layers(self, model: nn.Module, base_state: Mapping[str, Tensor]) -> list[str]:
        exclude = set()
        if not self.include_embeddings:
            for n, m in model.named_modules():
                if isinstance(m, nn.Embedding):
                    exclude.add(f"{n}.weight" if n else "weight")
        keys = list(self.exclude_keys or [])
        layers = core.default_layers(model, base_state, exclude=exclude)
        return [n for n in layers if not any(k in n for k in keys)]

    # ----------------------------------------------------------------- loss
    def _loss_fn(self, model: nn.Module, device) -> core.LossFn:
        def fn(forward: core.Forward, item) -> Tensor:
            task, batch = item
            return self.compute_loss(forward, _to_device(batch, device), task)

        return fn

    def compute_loss(self, forward: core.Forward, batch: Any, task: str) -> Tensor:
        """Calibration loss of one batch (override for other model kinds).

        * ``(inputs, labels)``: ``forward(inputs)`` gives class logits;
        * dict for a sequence classifier: ``logits`` ``[B, C]``;
        * a dict (Hugging Face sequence classifier, seq2seq or causal LM):
          :func:`pave_plugins.rethink.losses.batch_loss` (the rule ``pave rethink`` uses too).
        """
        loss = self.loss
        if isinstance(batch, (tuple, list)):
            inputs, labels = batch[0], (batch[1] if len(batch) > 1 else None)
            out = forward(inputs)
            logits = out.logits if hasattr(out, "logits") else out
            return core.classification_loss(logits, labels if loss == "ce" else None, loss)
        if not isinstance(batch, Mapping):
            raise RethinkConfigError(f"rethink: cannot compute a loss on a batch of type {type(batch).__name__}; override compute_loss")
        try:
            return batch_loss(forward, batch, loss)
        except ValueError as exc:
            if str(exc) == NEEDS_LABELS:
                raise RethinkConfigError(f"rethink: {exc}") from exc
            raise

    # --------------------------------------------------------------- output
    def _finish(self, result: core.RethinkResult, names: list[str], timings: dict) -> None:
        log_dir = algorithm_log_dir(self) or getattr(getattr(self, "_program", None), "log_dir", None)
        report = {
            "method": "pave/rethink (LoRA-DV spectral rethinking)",
            "inner": str(self._inner_cfg._target_),
            "models": names,
            "loss": self.loss,
            "iterations": self.iterations,
            "epochs": self.epochs,
            "lr": self.lr,
            "mode": self.mode,
            "n_samples": self.n_samples,
            "layers": len(result.layers),
            "changed_layers": len(result.changed),
            "losses": result.losses,
            "timings": timings,
        }
        self.last_report = report
        lam_path = self.lambda_save_path or (f"{log_dir}/rethink_lambda.safetensors" if log_dir else None)
        if lam_path and result.layers:
            save_lambdas(result, lam_path, inputs=self._run_inputs, flag="method.lambda_save_path")
            log.info("rethink: learned Lambda written to %s", lam_path)
        rep_path = self.report_path or (f"{log_dir}/rethink_report.json" if log_dir else None)
        if rep_path:
            write_json(rep_path, report, inputs=self._run_inputs)
        save_path = program_save_path(self)
        if save_path is not None:
            save_tokenizer_with_model(self)
        if save_path is not None and self.write_model_card:
            program = self._program
            file_save = type(program.modelpool).save_model is BaseModelPool.save_model
            losses = ", ".join(f"{l[0]:.4g} -> {l[-1]:.4g}" for l in result.losses if l) or "no training"
            write_model_card(
                save_path,
                method=f"LoRA-DV spectral rethinking of {str(self._inner_cfg._target_).rsplit('.', 1)[-1]} (pave_plugins `pave/rethink`)",
                description=(
                    f"{len(names)} models ({', '.join(names)}) merged with `{self._inner_cfg._target_}`, then every 2-D "
                    f"difference vector to the pre-trained model rescaled in its singular basis (U, V frozen, Lambda "
                    f"learned with loss={self.loss}, T={self.iterations}, {self.epochs} epochs, lr={self.lr}, "
                    f"{self.n_samples} {self.calibration_split} samples per task, mode={self.mode})."
                ),
                papers=[papers.LORA_DV],
                config_yaml=program_config_yaml(self),
                details={"layers rethought": len(result.layers), "calibration loss per iteration": losses},
                is_file=file_save,
                inputs=self._run_inputs,
                tags=[*inner_tags(self._inner_cfg._target_), "lora-dv"],
                modelpool=program.modelpool,
            )


def _to_device(batch: Any, device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch

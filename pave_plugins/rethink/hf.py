"""Hugging Face side of LoRA-DV spectral rethinking (no maths here; see pave_plugins.core.rethink).

Calibration data, one jsonl file per task:

* text-to-text models (causal LM, seq2seq): fields ``input`` and ``target``; the loss is on the
  target tokens only (``ce``); ``entropy`` (eq. 14) uses the predicted distributions at the target
  positions when a target is given, otherwise at every input position (causal LM) or at the first
  decoder step (seq2seq);
* sequence classifiers: field ``text`` (or ``template``, a Python format string over the record,
  e.g. ``"{sentence1} [SEP] {sentence2}"``) and ``label`` (an int, or a name in the head's
  ``config.label2id``); every task is evaluated through its own classification head, taken from
  that task's fine-tuned model (``heads={task: model dir}``); without heads every task uses the
  merged model's head.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from pave_plugins.collect.data import (
    check_lengths,
    check_rows,
    ensure_pad_token,
    model_positions,
    read_jsonl,
    seeded_subset,
    template_fields,
)
from pave_plugins.core import rethink as core
from pave_plugins.io import strict_json
from pave_plugins.rethink.card import RECIPE_FILE, rethought_card
from pave_plugins.rethink.losses import batch_loss
from pave_plugins.rethink.output import LAMBDA_FILE, save_lambdas
from pave_plugins.rethink.progress import tqdm_bar

log = logging.getLogger(__name__)

TASK_TYPES = ("seq-cls", "seq2seq", "causal-lm")


# ----------------------------------------------------------------------------- data
def read_calibration(
    path: str | os.PathLike, *, limit: int | None = None, seed: int = 0, fields: Sequence[str] = (),
    why: Mapping[str, str] | None = None,
) -> list[dict]:
    """Records of a jsonl calibration file; ``limit`` keeps a seeded random subset of that size
    (the paper samples 32 per task). Every record (not only the subset) must have ``fields``
    (``why[field]`` says why in the error)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file not found: {path}")
    records = read_jsonl(path)
    if not records:
        raise ValueError(f"calibration file {path} has no records")
    check_rows(records, fields, f"calibration file {path}", why)
    keep = seeded_subset(len(records), limit, torch.Generator().manual_seed(int(seed)))
    return [records[i] for i in keep]


def model_kind(config: Any) -> str:
    """``seq-cls`` | ``seq2seq`` | ``causal-lm`` from a transformers config."""
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "seq-cls"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or not archs:
        return "causal-lm"
    raise ValueError(
        f"cannot tell the task type of architecture {archs}: pass task_type (seq-cls, seq2seq or causal-lm)"
    )


def auto_class(kind: str):
    import transformers

    return {
        "seq-cls": transformers.AutoModelForSequenceClassification,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
        "causal-lm": transformers.AutoModelForCausalLM,
    }[kind]


def _label_id(value: Any, label2id: Mapping[str, int] | None, where: str) -> int:
    """The class index of a label (an int or a name in the head's ``label2id``), within the head's classes."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: label must be an int or a label name, got {value!r}")
    if isinstance(value, str) and label2id and value in label2id:
        return int(label2id[value])
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int):
        raise ValueError(
            f"{where}: label {value!r} is neither an int nor a name in the head's label2id {dict(label2id or {})}"
        )
    if label2id and not 0 <= value < len(label2id):
        raise ValueError(f"{where}: label {value} is outside the head's {len(label2id)} classes (0-{len(label2id) - 1}); "
                         "give this task's fine-tuned model with --heads TASK=DIR")
    return value


def _text(rec: dict, template: str | None, field_name: str, where: str) -> str:
    if template is not None:
        try:
            return template.format_map(rec)
        except KeyError as exc:
            raise ValueError(f"{where}: template needs field {exc} (record has {sorted(rec)})") from exc
        except (ValueError, IndexError, AttributeError, TypeError) as exc:  # a bad format spec, {a[9]}, {a.b}
            raise ValueError(f"{where}: the template {template!r} cannot format it ({type(exc).__name__}: {exc})") from None
    if field_name not in rec:
        raise ValueError(f"{where}: missing field {field_name!r} (record has {sorted(rec)}); give a template")
    return str(rec[field_name])


def build_batches(
    task: str,
    records: Sequence[dict],
    tokenizer: Any,
    kind: str,
    *,
    loss: str = "ce",
    batch_size: int = 8,
    max_length: int = 256,
    template: str | None = None,
    text_field: str = "text",
    label_field: str = "label",
    input_field: str = "input",
    target_field: str = "target",
    label2id: Mapping[str, int] | None = None,
    decoder_start_token_id: int | None = None,
) -> list[dict]:
    """Tokenised batches of one task (batches never mix tasks: each task may have its own head)."""
    if kind not in TASK_TYPES:
        raise ValueError(f"task type must be one of {TASK_TYPES}, got {kind!r}")
    ensure_pad_token(tokenizer)
    batches = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        where = f"task {task!r}, records {start}-{start + len(chunk) - 1}"
        if kind == "seq-cls":
            texts = [_text(r, template, text_field, where) for r in chunk]
            enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            batch = dict(enc)
            if loss == "ce":
                if any(label_field not in r for r in chunk):
                    raise ValueError(f"{where}: missing field {label_field!r} (needed by loss=ce)")
                batch["labels"] = torch.tensor([_label_id(r[label_field], label2id, where) for r in chunk])
        else:
            prompts = [_text(r, template, input_field, where) for r in chunk]
            has_target = all(target_field in r for r in chunk)
            if loss == "ce" and not has_target:
                raise ValueError(f"{where}: missing field {target_field!r} (needed by loss=ce)")
            targets = [str(r[target_field]) for r in chunk] if has_target else None
            batch = _text_to_text(tokenizer, kind, prompts, targets, max_length, decoder_start_token_id)
        batch["task"] = task
        batches.append(batch)
    return batches


def _text_to_text(tokenizer, kind, prompts, targets, max_length, decoder_start_token_id) -> dict:
    pad = tokenizer.pad_token_id
    if kind == "seq2seq":
        enc = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch = dict(enc)
        if targets is not None:
            lab = tokenizer(text_target=targets, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            labels = lab["input_ids"].masked_fill(lab["attention_mask"] == 0, -100)
            batch["labels"] = labels
        else:
            start = decoder_start_token_id if decoder_start_token_id is not None else pad
            batch["decoder_input_ids"] = torch.full((len(prompts), 1), int(start), dtype=torch.long)
        return batch
    # causal LM: prompt + target, loss on the target tokens
    rows, label_rows = [], []
    for i, p in enumerate(prompts):
        ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        labels = [-100] * len(ids)
        if targets is not None:
            tgt = tokenizer(targets[i], add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                tgt = tgt + [tokenizer.eos_token_id]
            ids, labels = ids + tgt, labels + tgt
        if len(ids) > max_length:  # keep the end (the target)
            ids, labels = ids[-max_length:], labels[-max_length:]
        rows.append(ids)
        label_rows.append(labels)
    n = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), n), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), n), dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, label_rows)):
        input_ids[i, : len(r)] = torch.tensor(r)
        attention[i, : len(r)] = 1
        labels[i, : len(l)] = torch.tensor(l)
    batch = {"input_ids": input_ids, "attention_mask": attention}
    if targets is not None:
        if not bool((labels != -100).any()):
            raise ValueError("causal LM calibration batch has no target token left after truncation; raise max_length")
        batch["labels"] = labels
    return batch


def _to(batch: Mapping[str, Any], device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def hf_loss_fn(
    kind: str,
    loss: str,
    *,
    heads: Mapping[str, Mapping[str, Tensor]] | None = None,
    device: torch.device | str | None = None,
    model: nn.Module | None = None,
) -> core.LossFn:
    """``loss_fn(forward, batch)`` for :func:`pave_plugins.core.rethink.rethink` on the batches of
    :func:`build_batches` (``heads[task]`` replaces the classification head of that task); the loss
    itself is :func:`pave_plugins.rethink.losses.batch_loss`, which reads the model kind from the
    model (``kind`` and ``model`` are accepted for compatibility and not needed)."""
    if loss not in core.LOSSES:
        raise ValueError(f"loss must be one of {core.LOSSES}, got {loss!r}")

    def fn(forward: core.Forward, batch: Mapping[str, Any]) -> Tensor:
        batch = _to(batch, device) if device is not None else dict(batch)
        task = batch.pop("task", None)
        extra = heads.get(task) if heads and task is not None else None
        return batch_loss(forward, batch, loss, params=extra)

    return fn


# ----------------------------------------------------------------------------- models
def head_parameter_names(model: nn.Module) -> list[str]:
    """Parameters of a sequence classifier outside its body (``base_model_prefix``): the head."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = [n for n, _ in model.named_parameters() if not (prefix and n.startswith(prefix + "."))]
    if not names:
        raise ValueError(f"cannot find the classification head of {type(model).__name__} (base_model_prefix={prefix!r})")
    return names


def embedding_parameter_names(model: nn.Module) -> set[str]:
    """Weights of input/output embeddings (excluded from rethinking unless asked)."""
    out = set()
    ids = set()
    for mod in (getattr(model, "get_input_embeddings", lambda: None)(), getattr(model, "get_output_embeddings", lambda: None)()):
        if mod is not None and getattr(mod, "weight", None) is not None:
            ids.add(id(mod.weight))
    for n, m in model.named_modules():
        if isinstance(m, nn.Embedding):
            ids.add(id(m.weight))
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in ids:
            out.add(n)
    return out


@dataclass
class LoraAdapter:
    """One PEFT LoRA adapter: ``{weight name: (B, A)}`` with the LoRA scaling folded into ``B``."""

    path: Path
    factors: dict[str, tuple[Tensor, Tensor]]
    scaling: float
    ignored: list[str] = field(default_factory=list)


def load_lora_adapter(path: str | os.PathLike) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``delta W = scaling * B @ A`` with ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA);
    ``fan_in_fan_out`` (GPT-2 Conv1D) adapters are transposed to the weight's layout.
    """
    from safetensors.torch import load_file

    from pave_plugins.io.adapters import read_adapter_config

    path = Path(path)
    w_path = path / "adapter_model.safetensors"
    cfg = read_adapter_config(path, lora_only=True)
    if not w_path.is_file():
        raise FileNotFoundError(f"{path} is not a PEFT adapter folder (needs adapter_config.json and adapter_model.safetensors)")
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{path}: adapters with rank_pattern/alpha_pattern are not supported")
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    fan = bool(cfg.get("fan_in_fan_out", False))
    tensors = load_file(str(w_path))
    factors, ignored = {}, []
    for key, a in tensors.items():
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                ignored.append(key)
            continue
        bkey = key.replace(".lora_A.", ".lora_B.")
        if bkey not in tensors:
            raise ValueError(f"{path}: {key} has no matching {bkey}")
        module = key.split(".lora_A.")[0]
        for prefix in ("base_model.model.",):
            module = module.removeprefix(prefix)
        b = tensors[bkey]
        if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"{path}: {key} {tuple(a.shape)} and {bkey} {tuple(b.shape)} are not the two factors "
                             "of one LoRA update (B is out x r, A is r x in)")
        b, a = b.float() * scaling, a.float()
        if fan:  # stored weight is (in x out): delta^T = A^T B^T
            b, a = a.T.contiguous(), b.T.contiguous()
        factors[f"{module}.weight"] = (b, a)
    if not factors:
        raise ValueError(f"{path}: no lora_A/lora_B tensors found")
    if ignored:
        log.warning("LoRA adapter %s: %d non-LoRA tensors ignored (e.g. %s)", path, len(ignored), ignored[0])
    return LoraAdapter(path=path, factors=factors, scaling=scaling, ignored=ignored)


# ----------------------------------------------------------------------------- the job
@dataclass
class RethinkJob:
    """Everything ``pave rethink`` does, as data (see :func:`run_job`): the LoRA-DV
    hyper-parameters in ``config`` (:class:`pave_plugins.core.rethink.RethinkConfig`), the rest
    says where the models and data are and how to read them."""

    base: str
    out: str
    calib: Mapping[str, str]
    config: core.RethinkConfig = field(default_factory=core.RethinkConfig)
    merged: str | None = None
    lora: Mapping[str, str] | None = None
    lora_weights: Sequence[float] | None = None
    heads: Mapping[str, str] | None = None
    task_type: str = "auto"
    tokenizer: str | None = None  # folder of the tokenizer; default: the merged folder's, else the base's
    max_length: int = 256
    template: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    input_field: str = "input"
    target_field: str = "target"
    include_embeddings: bool = False
    device: str = "auto"
    overwrite: bool = False
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {self.max_length!r}")
        if self.task_type != "auto" and self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be auto or one of {TASK_TYPES}, got {self.task_type!r}")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def _load_tokenizer(job: RethinkJob):
    """The tokenizer of ``--tokenizer``, else of the merged folder, else of the base folder."""
    from transformers import AutoTokenizer

    dirs = [job.tokenizer] if job.tokenizer else [d for d in (job.merged, job.base) if d is not None]
    for d in dirs:
        # transformers builds an empty tokenizer from a bare config.json: only folders with files count
        if not Path(d).is_dir() or not any((Path(d) / f).is_file() for f in TOKENIZER_FILES):
            continue
        try:
            return AutoTokenizer.from_pretrained(d), d
        except Exception as exc:  # try the next folder
            log.debug("rethink: no tokenizer in %s (%s)", d, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if job.tokenizer:
        raise ValueError(f"--tokenizer {job.tokenizer}: no tokenizer could be loaded from that folder")
    raise ValueError(f"no tokenizer found in {' or '.join(dirs)}; pass --tokenizer DIR "
                     "(a folder with the tokenizer files, e.g. the fine-tuned or base model's)")


def run_job(job: RethinkJob) -> dict:
    """Load, rethink, save (atomic). Returns the recipe dict written to ``rethink.json``."""
    from transformers import AutoConfig

    from pave_plugins.io.checkpoints import load_pretrained

    _check_job(job)
    cfg = job.config
    torch.manual_seed(int(cfg.seed))
    device = _device(job.device)
    src = job.merged if job.merged is not None else job.base
    config = AutoConfig.from_pretrained(src)
    kind = model_kind(config) if job.task_type == "auto" else job.task_type
    cls = auto_class(kind)
    log.info("rethink: %s model from %s (%s)", kind, src, cls.__name__)
    model = load_pretrained(cls, src, allow_pickle=job.allow_pickle, dtype="auto")
    base_state = _base_state(job, cls, model)
    low_rank = _merge_lora(job, model) if job.lora else {}
    tokenizer, tok_dir = _load_tokenizer(job)
    model.to(device)
    head_names: list[str] = head_parameter_names(model) if kind == "seq-cls" else []
    heads, label2ids = _task_heads(job, cls, config, kind, head_names, device)
    batches, samples_used = _calibration_batches(job, tokenizer, kind, config, label2ids)
    exclude = set(head_names) | (set() if job.include_embeddings else embedding_parameter_names(model))
    layers = [] if job.lora else core.default_layers(model, base_state, exclude=exclude)
    result = core.rethink(
        model, base_state, batches, hf_loss_fn(kind, cfg.loss, heads=heads, device=device),
        layers=layers, low_rank=low_rank, config=cfg, progress_bar=tqdm_bar,
    )
    recipe = _recipe(job, kind, result)
    recipe.update(samples_per_task=samples_used, tokenizer=str(tok_dir))  # records actually used (at most --samples)
    _save(job, model, tokenizer, result, recipe)
    log.info("rethink: wrote %s", job.out)
    return recipe


WHO = "pave rethink"


def _inputs(job: RethinkJob) -> dict[str, list]:
    return {"--base": [job.base], "--merged": [job.merged], "--lora": list((job.lora or {}).values()),
            "--heads": list((job.heads or {}).values()), "--calib": list(job.calib.values()),
            "--tokenizer": [job.tokenizer]}


def _check_job(job: RethinkJob) -> None:
    """Everything that can be refused before a model is loaded."""
    from pave_plugins.io.output import check_output

    if (job.merged is None) == (not job.lora):
        raise ValueError("give either a merged model folder (--merged) or LoRA adapters (--lora), not both")
    if not job.calib:
        raise ValueError("no calibration file (--calib task=file.jsonl ...)")
    check_output(job.out, who=WHO, inputs=_inputs(job), overwrite=job.overwrite)
    for d in [job.base, job.merged, *(job.lora or {}).values(), *(job.heads or {}).values()]:
        if d is not None and not Path(d).exists():
            raise FileNotFoundError(f"model folder not found: {d}")


def _base_state(job: RethinkJob, cls, model: nn.Module) -> dict[str, Tensor]:
    """theta_pre: the base model's tensors (a copy of the model's own when LoRA adapters are merged in)."""
    from pave_plugins.io.checkpoints import load_pretrained

    if job.merged is None:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    base_model = load_pretrained(cls, job.base, allow_pickle=job.allow_pickle, dtype="auto")
    return {k: v.detach() for k, v in base_model.state_dict().items()}


def _merge_lora(job: RethinkJob, model: nn.Module) -> dict[str, core.LowRankDelta]:
    """LoRA experts: merged = base + sum_i w_i B_i A_i written into ``model``; the factors for the fast path."""
    from pave_plugins.io.adapters import check_factor_shapes

    names = list(job.lora)
    weights = list(job.lora_weights) if job.lora_weights else [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} --lora-weights for {len(names)} adapters")
    adapters = [load_lora_adapter(job.lora[n]) for n in names]
    params = dict(model.named_parameters())
    low_rank: dict[str, core.LowRankDelta] = {}
    for key in sorted(set().union(*(a.factors for a in adapters))):
        if key not in params:
            raise ValueError(f"LoRA adapter targets {key!r}, which the base model {job.base} does not have")
        pairs = [(n, w, a.factors[key]) for n, w, a in zip(names, weights, adapters) if key in a.factors]
        for n, _, (b_, a_) in pairs:
            check_factor_shapes(job.lora[n], key, (b_.shape[0], a_.shape[1]), tuple(params[key].shape), job.base)
        low_rank[key] = core.LowRankDelta([f[0] for _, _, f in pairs], [f[1] for _, _, f in pairs],
                                          [w for _, w, _ in pairs])
        with torch.no_grad():
            p = params[key]
            p.copy_((p.to(torch.float32) + low_rank[key].dense(torch.float32)).to(p.dtype))
    log.info("rethink: %d LoRA adapters merged (weights %s) on %d layers", len(names), weights, len(low_rank))
    return low_rank


def _task_heads(job: RethinkJob, cls, config, kind: str, head_names: list[str], device):
    """Per-task classification heads (``--heads``) and each task's ``label2id``."""
    from pave_plugins.io.checkpoints import load_pretrained

    heads: dict[str, dict[str, Tensor]] = {}
    label2ids: dict[str, Mapping[str, int] | None] = {task: getattr(config, "label2id", None) for task in job.calib}
    if not job.heads:
        if kind == "seq-cls" and len(job.calib) > 1:
            log.warning("rethink: no --heads given; every task is evaluated through the merged model's own head")
        return heads, label2ids
    if kind != "seq-cls":
        raise ValueError("--heads applies to sequence classifiers only")
    missing = [t for t in job.calib if t not in job.heads]
    if missing:
        raise ValueError(f"no head for task(s) {missing}: give --heads {missing[0]}=<fine-tuned model dir> for each task")
    for task in job.calib:
        ft = load_pretrained(cls, job.heads[task], allow_pickle=job.allow_pickle, dtype="auto")
        sd = dict(ft.named_parameters())
        heads[task] = {n: sd[n].detach().to(device) for n in head_names if n in sd}
        if len(heads[task]) != len(head_names):
            raise ValueError(f"fine-tuned model {job.heads[task]} lacks head parameters {set(head_names) - set(heads[task])}")
        label2ids[task] = getattr(ft.config, "label2id", None)
    return heads, label2ids


@dataclass(frozen=True)
class CalibrationFields:
    """How calibration records become examples: the fields (or a template) that ``pave rethink`` and
    FusionBench's ``pave/rethink`` read from a jsonl file."""

    template: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    input_field: str = "input"
    target_field: str = "target"
    max_length: int = 256
    #: how the message of a missing label names the unlabelled loss (the CLI's flag, a config key)
    entropy_hint: str = "--loss entropy"

    def required(self, kind: str, loss: str) -> tuple[list[str], dict[str, str]]:
        """The record fields an example is built from (labels / targets only for ``ce``), and why."""
        fields = template_fields(self.template) if self.template is not None else [
            self.text_field if kind == "seq-cls" else self.input_field]
        why = {}
        if loss == "ce":
            name = self.label_field if kind == "seq-cls" else self.target_field
            fields.append(name)
            why[name] = f"needed by loss=ce; {self.entropy_hint} needs none"
        return fields, why


def calibration_files(value: Any, what: str = "calibration") -> dict[str, str]:
    """``{task: file}`` from one file, a list of files (each task named by its file's stem) or a
    mapping ``{task: file}``; two files with one name are refused."""
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    out: dict[str, str] = {}
    for v in value or []:
        name = Path(str(v)).stem
        if name in out:
            raise ValueError(f"{what}: two files for task {name!r} ({out[name]}, {v}); name them {{task: file}}")
        out[name] = str(v)
    return out


def calibration_batches(calib: Mapping[str, str], tokenizer, kind: str, config, cfg: core.RethinkConfig,
                        fields: CalibrationFields, label2ids: Mapping[str, Any] | None = None
                        ) -> tuple[list[dict], dict[str, int]]:
    """The batches of every task's calibration file, and how many records each contributed (every
    file read and checked: records, fields, lengths against the model's positions)."""
    batches: list[dict] = []
    used: dict[str, int] = {}
    needed, why = fields.required(kind, cfg.loss)
    for task, path in calib.items():
        records = read_calibration(path, limit=cfg.samples, seed=cfg.seed, fields=needed, why=why)
        used[task] = len(records)
        try:
            batches += build_batches(
                task, records, tokenizer, kind, loss=cfg.loss, batch_size=cfg.batch_size, max_length=fields.max_length,
                template=fields.template, text_field=fields.text_field, label_field=fields.label_field,
                input_field=fields.input_field, target_field=fields.target_field,
                label2id=(label2ids or {}).get(task), decoder_start_token_id=getattr(config, "decoder_start_token_id", None),
            )
        except ValueError as exc:  # name the file, not only the task and record numbers
            raise ValueError(f"calibration file {path}: {exc}") from exc
        lengths = [int(b["input_ids"].shape[-1]) for b in batches if torch.is_tensor(b.get("input_ids"))]
        check_lengths(lengths, model_positions(config), f"calibration file {path}")
    return batches, used


def _calibration_batches(job: RethinkJob, tokenizer, kind: str, config, label2ids) -> tuple[list[dict], dict[str, int]]:
    """The batches of every task of ``job``, and how many records each task contributed."""
    fields = CalibrationFields(template=job.template, text_field=job.text_field, label_field=job.label_field,
                               input_field=job.input_field, target_field=job.target_field, max_length=job.max_length)
    return calibration_batches(job.calib, tokenizer, kind, config, job.config, fields, label2ids)


def _recipe(job: RethinkJob, kind: str, result: core.RethinkResult) -> dict:
    cfg = job.config
    return {
        "method": "LoRA-DV spectral rethinking (pave_plugins)",
        "base": str(job.base),
        "merged": str(job.merged) if job.merged else None,
        "lora": {k: str(v) for k, v in (job.lora or {}).items()} or None,
        "lora_weights": list(job.lora_weights) if job.lora_weights else ([1.0] * len(job.lora) if job.lora else None),
        "heads": dict(job.heads) if job.heads else None,
        "task_type": kind,
        "calibration": {t: str(p) for t, p in job.calib.items()},
        "samples_per_task": cfg.samples,
        "loss": cfg.loss,
        "iterations": cfg.iterations,
        "epochs": cfg.epochs,
        "lr": cfg.lr,
        "mode": cfg.mode,
        "top_k": cfg.top_k,
        "keep_tail": cfg.keep_tail,
        "redecompose": cfg.redecompose,
        "compute_dtype": str(cfg.compute_dtype).removeprefix("torch."),
        "seed": cfg.seed,
        "layers": len(result.layers),
        "low_rank_layers": sum(v == "low_rank" for v in result.paths.values()),
        "changed_layers": len(result.changed),
        "losses": result.losses,
    }


def _save(job: RethinkJob, model: nn.Module, tokenizer, result: core.RethinkResult, recipe: dict) -> None:
    """The model folder, tokenizer, Lambda file, recipe and model card, moved into place when complete."""
    from pave_plugins.io.output import output_folder

    with output_folder(job.out, who=WHO, inputs=_inputs(job), overwrite=job.overwrite) as tmp:
        model.to("cpu")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_lambdas(result, tmp / LAMBDA_FILE, recipe)
        (tmp / RECIPE_FILE).write_text(strict_json.dumps(recipe, indent=2), encoding="utf-8")
        (tmp / "README.md").write_text(rethought_card(recipe, job.out), encoding="utf-8")

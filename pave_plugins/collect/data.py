"""Calibration texts for covariance collection: local files or Hugging Face datasets, sampled and batched.

Sources (``load_table``):

* ``*.jsonl`` (one JSON object per line), ``*.json`` (a list of objects, or JSON lines),
  ``*.csv`` / ``*.tsv`` (header row), ``*.txt`` (one example per non-empty line, field ``text``);
* ``*.parquet`` / ``*.arrow`` files and folders written by ``datasets``' ``save_to_disk``
  (a ``DatasetDict`` needs ``split``), loaded with ``datasets``;
* a folder of such files (all of them, in name order).

A text is one field (``text_field``; default ``text``, or the only string column) or a template
filled with the row's fields (``"{sentence1} {sentence2}"``). ``sample_indices`` draws ``n`` rows
without replacement with a seeded generator, so the same ``--seed`` picks the same rows.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet", ".arrow"}


class DataError(ValueError):
    """Calibration data is missing, empty, or lacks the field a text is built from."""


def read_text(path: Path) -> str:
    """A data file's text: UTF-8, a leading byte-order mark dropped (spreadsheet exports write one);
    bytes that are not UTF-8 are a :class:`DataError` naming the file, line and byte."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                        "save the file as UTF-8") from None


def lines(path: Path) -> list[str]:
    """The lines of a text data file (``\n`` or ``\r\n``; other Unicode line breaks stay inside a line,
    as JSON allows them in strings)."""
    return [line.removesuffix("\r") for line in read_text(path).split("\n")]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (blank lines skipped; a bare string is a row ``{"text": ...}``);
    a bad line is a :class:`DataError` naming the file and line."""
    rows = []
    for i, line in enumerate(lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {i} is not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            row = {"text": row} if isinstance(row, str) else None
            if row is None:
                raise DataError(f"{path}: line {i} is not a JSON object")
        rows.append(row)
    return rows


def _read_file(path: Path, split: str | None) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        text = read_text(path)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return read_jsonl(path)
        if isinstance(obj, dict) and split is not None and isinstance(obj.get(split), list):
            obj = obj[split]
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list):
            raise DataError(f"{path}: expected a JSON list of objects (or JSON lines)")
        return [r if isinstance(r, dict) else {"text": r} for r in obj]
    if suffix in (".csv", ".tsv"):
        return _read_table(path, "\t" if suffix == ".tsv" else ",")
    if suffix == ".txt":
        return [{"text": line} for line in lines(path) if line.strip()]
    if suffix in (".parquet", ".arrow"):
        import datasets

        builder = "parquet" if suffix == ".parquet" else "arrow"
        quiet = logging.getLogger("datasets")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # its own ERROR line would repeat ours without the file's name
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as exc:  # ArrowInvalid, DatasetGenerationError, OSError: a file that is not one
            raise DataError(f"{path}: cannot read it as a {builder} file ({str(exc).splitlines()[0]})") from None
        finally:
            quiet.setLevel(level)
    raise DataError(f"{path}: unsupported data file type {suffix!r} (use {sorted(TEXT_SUFFIXES)})")


def _read_table(path: Path, delimiter: str) -> list[dict[str, Any]]:
    """Rows of a CSV / TSV file with a header; a row with more or fewer cells is named."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
    rows = []
    try:
        for row in reader:
            if None in row or None in row.values():
                raise DataError(f"{path}: line {reader.line_num} has {'more' if None in row else 'fewer'} cells than "
                                f"the header {reader.fieldnames}")
            rows.append(row)
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: {exc}") from None
    return rows


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def load_table(path: str | Path, *, split: str | None = None) -> Any:
    """Rows of a data source: a list of dicts or a ``datasets.Dataset`` (``len`` and ``[i] -> dict``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.is_dir() and _is_saved_dataset(path):
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            names = list(ds.keys())
            if split is None:
                if "train" in ds:
                    split = "train"
                elif len(names) == 1:
                    split = names[0]
                else:
                    raise DataError(f"{path}: a dataset with splits {names}; choose one with --split")
            if split not in ds:
                raise DataError(f"{path}: no split {split!r} (splits: {names})")
            ds = ds[split]
        elif split is not None:
            log.info("%s is a single dataset; --split %s ignored", path, split)
        return ds
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in TEXT_SUFFIXES and not p.name.startswith("."))
        if split is not None:
            chosen = [p for p in files if p.stem == split or p.stem.startswith(split + "-") or p.stem.startswith(split + ".")]
            if not chosen:
                raise DataError(f"{path}: no data file for split {split!r} (files: {[p.name for p in files]})")
            files = chosen
        if not files:
            raise DataError(f"{path}: no data files ({sorted(TEXT_SUFFIXES)}) and not a saved dataset")
        rows: list[Any] = []
        for f in files:
            part = _read_file(f, None)
            rows.extend(part if isinstance(part, list) else [part[i] for i in range(len(part))])
        return rows
    if split is not None and path.suffix.lower() != ".json":
        log.warning("%s is a single file without splits: --split %s ignored", path, split)
    return _read_file(path, split)


def columns_of(table: Any) -> list[str]:
    """Column names: a dataset's own, or the fields of all rows of a list (in first-seen order)."""
    names = getattr(table, "column_names", None)
    if names is not None:
        return list(names)
    cols: dict[str, None] = {}
    for row in table:
        cols.update(dict.fromkeys(row))
    return list(cols)


def template_fields(template: str) -> list[str]:
    """The record fields a format string reads (``{a} {b[0]} {c.d}`` -> ``a, b, c``)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise DataError(f"template {template!r} is not a valid format string ({exc})") from exc
    return list(dict.fromkeys(f.split(".")[0].split("[")[0] for _, f, _, _ in parsed if f))


def check_rows(table: Any, fields: Sequence[str], source: str, why: Mapping[str, str] | None = None) -> None:
    """Every row of a list table has every field (a dataset's columns are the same for all rows):
    else a :class:`DataError` naming the file, the row (1-based), the fields that row has and
    ``why[field]`` when given."""
    if not isinstance(table, list):
        return
    for i, row in enumerate(table):
        missing = [f for f in fields if f not in row]
        if missing:
            reason = f"; {why[missing[0]]}" if why and missing[0] in why else ""
            raise DataError(f"{source}: row {i + 1} has no field {missing[0]!r} (that row has {sorted(row)}{reason})")


def text_builder(table: Any, *, text_field: str | None = None, template: str | None = None, source: str = "data"):
    """A function ``row -> text`` after checking that every row has the fields it reads."""
    cols = columns_of(table)
    if text_field and template:
        raise DataError("give either a text field or a template, not both")
    if template is not None:
        fields = template_fields(template)
        if not fields:
            raise DataError(f"template {template!r} names no field (use e.g. '{{sentence1}} {{sentence2}}')")
        missing = [f for f in fields if f not in cols]
        if missing:
            raise DataError(f"{source}: template fields {missing} are not columns of the data (columns: {cols})")
        check_rows(table, fields, source)
        _check_template(table, template, source)
        return lambda row: template.format_map(row)
    if text_field is None:
        text_field = _default_text_field(table, cols, source)
    if text_field not in cols:
        raise DataError(f"{source}: text field {text_field!r} is not a column of the data (columns: {cols})")
    check_rows(table, [text_field], source)
    field = text_field
    return lambda row: row[field] if isinstance(row[field], str) else ("" if row[field] is None else str(row[field]))


def _check_template(table: Any, template: str, source: str) -> None:
    """The template formats every row of a list table (the first of a dataset): else a
    :class:`DataError` naming the file, the row and the reason (a bad format spec, a missing key)."""
    n = len(table) if isinstance(table, list) else min(len(table), 1)
    for i in range(n):
        try:
            template.format_map(table[i])
        except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
            raise DataError(f"{source}: row {i + 1}: the template {template!r} cannot format it "
                            f"({type(exc).__name__}: {exc})") from None


def _default_text_field(table: Any, cols: list[str], source: str) -> str:
    """``text``, or the only column holding strings (in the first row)."""
    if "text" in cols:
        return "text"
    first = table[0] if len(table) else {}
    str_cols = [c for c in cols if isinstance(first.get(c), str)]
    if len(str_cols) != 1:
        raise DataError(
            f"{source}: no 'text' column; choose one with --text-field or build one with --template (columns: {cols})"
        )
    return str_cols[0]


def sample_indices(n_rows: int, n: int | None, seed: int) -> list[int]:
    """``n`` distinct row indices drawn with ``random.Random(seed)`` (all rows if ``n`` is None or too big), sorted."""
    if n is None or n >= n_rows:
        return list(range(n_rows))
    if n <= 0:
        raise DataError(f"the number of samples must be positive, got {n}")
    return sorted(random.Random(seed).sample(range(n_rows), n))


def seeded_subset(n_rows: int, n: int | None, generator: Any) -> list[int]:
    """The calibration subset of LoRA-DV: the first ``n`` of a ``torch.randperm`` drawn from
    ``generator`` (a ``torch.Generator``), sorted; all rows when ``n`` is None. Several tasks drawn
    from one generator get different subsets; a fresh generator per task repeats one draw."""
    import torch

    if n is not None and n <= 0:
        raise DataError(f"the number of samples must be positive, got {n}")
    if n is None or n >= n_rows:
        if n is not None:  # draw anyway: the generator advances as it always did
            torch.randperm(n_rows, generator=generator)
        return list(range(n_rows))
    return sorted(torch.randperm(n_rows, generator=generator)[:n].tolist())


def load_texts(
    path: str | Path,
    *,
    text_field: str | None = None,
    template: str | None = None,
    split: str | None = None,
    n_samples: int | None = None,
    seed: int = 0,
) -> list[str]:
    """Sampled, non-empty calibration texts from ``path`` (see the module doc for formats)."""
    table = load_table(path, split=split)
    if len(table) == 0:
        raise DataError(f"{path}: the data is empty (no rows)")
    build = text_builder(table, text_field=text_field, template=template, source=str(path))
    texts = []
    empty = 0
    for i in sample_indices(len(table), n_samples, seed):
        t = build(table[i])
        if t.strip():
            texts.append(t)
        else:
            empty += 1
    if empty:
        log.warning("%s: %d sampled row(s) have an empty text and were skipped", path, empty)
    if not texts:
        raise DataError(f"{path}: no non-empty text among the {len(table)} rows")
    return texts


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Rank ``rank``'s share (``items[rank::world_size]``); the shares of all ranks partition ``items``."""
    return list(items[rank::world_size])


def ensure_pad_token(tokenizer: Any) -> Any:
    """The one pad-token rule: a tokenizer without a pad token pads with its eos, else unk, else bos
    token (a tokenizer with none of them is refused)."""
    if getattr(tokenizer, "pad_token", None) is None:
        for cand in ("eos_token", "unk_token", "bos_token"):
            if getattr(tokenizer, cand, None) is not None:
                tokenizer.pad_token = getattr(tokenizer, cand)
                break
        else:
            raise DataError("the tokenizer has no pad, eos, unk or bos token to pad batches with")
    return tokenizer


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Right padding (real tokens keep their positions) and a pad token (:func:`ensure_pad_token`)."""
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    return tokenizer


def model_positions(config: Any) -> int | None:
    """How many token positions a model can read (learned position embeddings; RoBERTa-style
    models start their positions after the padding id), or None when its config does not say."""
    n = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions") if
              isinstance(getattr(config, k, None), int)), None)
    kind = str(getattr(config, "model_type", ""))
    if n is not None and ("roberta" in kind or kind == "camembert"):
        n -= int(getattr(config, "pad_token_id", 0) or 0) + 1
    return n


def check_lengths(lengths: Sequence[int], positions: int | None, source: str, flag: str = "--max-length") -> None:
    """Every tokenised text fits the model's positions: else a :class:`DataError` naming the first
    text too long and the flag that would make it fit."""
    if positions is None:
        return
    longest = max(lengths, default=0)
    if longest > positions:
        raise DataError(f"{source}: a text is {longest} tokens, more than the model's {positions} positions: "
                        f"lower {flag} to {positions} or less")


def tokenize_batches(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int,
    sort_by_length: bool = True,
    positions: int | None = None,
    source: str = "data",
) -> list[dict[str, Any]]:
    """Tokenised, right-padded batches (dicts of tensors with ``attention_mask``).

    ``sort_by_length`` groups texts of similar length (less padding, faster); the covariance is a
    sum over tokens, so the order does not change it.
    """
    if batch_size <= 0 or max_length <= 0:
        raise DataError(f"batch size and max length must be positive (got {batch_size}, {max_length})")
    prepare_tokenizer(tokenizer)
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    ids = enc["input_ids"]
    check_lengths([len(x) for x in ids], positions, source)
    order = list(range(len(ids)))
    if sort_by_length:
        order.sort(key=lambda i: -len(ids[i]))
    keys = [k for k in enc.keys() if k in ("input_ids", "attention_mask", "token_type_ids")]
    batches = []
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        feats = [{k: enc[k][i] for k in keys} for i in chunk]
        batches.append(dict(tokenizer.pad(feats, padding=True, return_tensors="pt")))
    return batches


"""Model cards ready to publish, for every face (mergekit methods, FusionBench algorithms, ``pave purify``,
``pave rethink``): the Hugging Face metadata block (``base_model`` only as a Hub id, never a local path;
``library_name``; ``tags`` naming the host and the method), the papers as links, and recipe text whose
local paths are replaced by their folder names. Text only: the faces write the card through their own
output (mergekit writes its README itself; the others through :mod:`pave_plugins.io.output`)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import yaml

from pave_plugins import papers as _papers

#: the method tags (Hub convention: lower case, hyphens)
METHOD_TAGS = {"pave": "pave", "tsv": "tsv-m", "regmean": "regmean", "lora-dv": "lora-dv"}
HOST_TAGS = {"mergekit": "mergekit", "fusion_bench": "fusion-bench"}
#: the line under every recipe whose paths were shortened
PATHS_NOTE = "Local paths of the machine that wrote this model are replaced by their folder names."

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_CACHE_SNAPSHOT = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/")
# an absolute (or home) path: not inside a URL (``://``, ``.org/abs``), a word, or a ``{placeholder}/``
_ABS_PATH = re.compile(r"(?<![\w.:/~}\-])~?/[\w.+@%=,\-]+(?:/[\w.+@%=,\-]+)*/?")


def hub_id(ref: object) -> str | None:
    """``ref`` when it reads as a Hugging Face Hub id (``org/name`` or ``name``) and names no local file."""
    if not isinstance(ref, str) or not _HUB_ID.match(ref) or ref.endswith((".", "-")) or ".." in ref:
        return None
    return None if os.path.exists(os.path.expanduser(ref)) else ref


def model_hub_id(ref: str | os.PathLike | None) -> str | None:
    """The Hub id a model reference names: the reference itself, a Hub cache snapshot's repository,
    or (for a local folder) what its ``config.json`` (``_name_or_path``) or ``adapter_config.json``
    (``base_model_name_or_path``) records as a Hub id; None otherwise."""
    if ref is None:
        return None
    ref = str(ref)
    found = hub_id(ref)
    if found:
        return found
    snapshot = _CACHE_SNAPSHOT.search(Path(ref).expanduser().as_posix())
    if snapshot:
        return f"{snapshot.group(1)}/{snapshot.group(2)}"
    for name, key in (("config.json", "_name_or_path"), ("adapter_config.json", "base_model_name_or_path")):
        try:
            value = json.loads((Path(ref).expanduser() / name).read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if hub_id(value):
            return value
    return None


def hub_ids(refs: Iterable[str | os.PathLike | None]) -> list[str]:
    """The distinct Hub ids of ``refs`` (:func:`model_hub_id`), in order."""
    out: list[str] = []
    for ref in refs:
        found = model_hub_id(ref)
        if found and found not in out:
            out.append(found)
    return out


def metadata(base_models: Sequence[str], tags: Sequence[str], library_name: str = "transformers") -> str:
    """The YAML block between ``---`` lines (``base_model`` left out when no Hub id is known)."""
    data: dict = {}
    if base_models:
        data["base_model"] = base_models[0] if len(base_models) == 1 else list(base_models)
    data["library_name"] = library_name
    data["tags"] = list(dict.fromkeys(tags))
    return "---\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True) + "---\n"


def method_tags(*methods: str | None) -> list[str]:
    """The tags of the named methods (``pave``, ``tsv``, ``regmean``, ``lora-dv``; others: none)."""
    return [METHOD_TAGS[m] for m in methods if m in METHOD_TAGS]


def paper_line(paper: _papers.Paper) -> str:
    """A Markdown bullet: the paper as a link (its title alone when it has no public address)."""
    if paper.url.startswith(("http://", "https://")):
        return f"- [{paper.title}]({paper.url})"
    return f"- {paper.title} ({paper.url})"


def folder_name(path: str) -> str:
    """The last component of a path (``/a/b/`` -> ``b``)."""
    return Path(path.rstrip("/")).name or path


def redact(text: str, paths: Iterable[str | os.PathLike | None] = ()) -> str:
    """``text`` with every local path replaced by its folder (or file) name: first the given ``paths``
    (as written and resolved, longest first: a path with spaces goes whole), then any absolute path left."""
    known: set[str] = set()
    for p in paths:
        if p is None or hub_id(str(p)):
            continue
        known.add(str(p))
        known.add(str(Path(p).expanduser().resolve()))
    for p in sorted(known, key=len, reverse=True):
        if len(p) > 1 and ("/" in p or os.sep in p):
            text = text.replace(p, folder_name(p))
    return _ABS_PATH.sub(lambda m: folder_name(m.group(0)), text)


def recipe_block(text: str, paths: Iterable[str | os.PathLike | None] = (), lang: str = "yaml") -> list[str]:
    """The recipe as a fenced block of redacted text, followed by :data:`PATHS_NOTE`."""
    return [f"```{lang}", redact(text, paths).rstrip(), "```", "", PATHS_NOTE, ""]


def split_card(text: str) -> tuple[dict, str]:
    """``(metadata, body)`` of a model card (empty metadata when it has no block)."""
    if text.startswith("---"):
        parts = text.split("\n---", 1)
        if len(parts) == 2:
            try:
                data = yaml.safe_load(parts[0].removeprefix("---")) or {}
            except yaml.YAMLError:
                data = {}
            return (data if isinstance(data, dict) else {}), parts[1].split("\n", 1)[-1] if "\n" in parts[1] else ""
    return {}, text


def demote(body: str) -> str:
    """A card's body as a section of another: its ``# title`` dropped, every heading one level down."""
    lines = body.strip("\n").splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    if lines and lines[0].startswith("# "):
        lines.pop(0)
    out, fenced = [], False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        out.append("#" + line if not fenced and re.match(r"#{1,5} ", line) else line)
    return "\n".join(out).strip("\n")

"""The publishable model card text (:mod:`pave_plugins.cards`): Hub ids only in ``base_model``, local
paths shortened to folder names, the metadata block as ``huggingface_hub`` reads it."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

from pave_plugins import cards, papers


def test_hub_id_is_never_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert cards.hub_id("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert cards.hub_id("gpt2") == "gpt2"
    for local in ("org/local", str(tmp_path / "org" / "local"), "/abs/x", "~/models/x", "./x", "a/b/c", "../x", None):
        assert cards.hub_id(local) is None, local


def test_model_hub_id_from_config_cache_and_adapter(tmp_path):
    with_config = tmp_path / "ft"
    with_config.mkdir()
    (with_config / "config.json").write_text(json.dumps({"_name_or_path": "org/base-7b"}))
    local_name = tmp_path / "ft2"
    local_name.mkdir()
    (local_name / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path / "elsewhere")}))
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base-7b"}))
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / "abc123"
    assert cards.model_hub_id(with_config) == "org/base-7b"
    assert cards.model_hub_id(local_name) is None  # a path recorded in the config is no Hub id
    assert cards.model_hub_id(adapter) == "org/base-7b"
    assert cards.model_hub_id(snapshot) == "org/name"
    assert cards.hub_ids([with_config, adapter, local_name, "gpt2"]) == ["org/base-7b", "gpt2"]


def test_redact_replaces_every_local_path_by_its_name():
    text = ("base_model: /home/ann/models/base\ncovariance: \"/work/covs/task 0.safetensors\"\n"
            "log_dir: {log_dir}/merged\nsee https://arxiv.org/abs/2510.14697 and runs/out\n"
            "home: ~/cache/ft_a, ratio 1/2\n")
    out = cards.redact(text, ["/work/covs/task 0.safetensors"])
    assert "base_model: base\n" in out and '"task 0.safetensors"' in out and "ft_a" in out
    assert "{log_dir}/merged" in out and "https://arxiv.org/abs/2510.14697" in out and "runs/out" in out
    assert "ratio 1/2" in out
    for gone in ("/home", "/work", "~/", "ann"):
        assert gone not in out, gone


@pytest.mark.parametrize("bases", [[], ["org/a"], ["org/a", "org/b"]])
def test_metadata_block_parses(tmp_path, bases):
    card = tmp_path / "README.md"
    card.write_text(cards.metadata(bases, ["merge", "mergekit", "pave", "pave"]) + "# t\n\n"
                    + cards.paper_line(papers.PAVE) + "\n")
    data = ModelCard.load(card).data
    assert data.library_name == "transformers" and data.tags == ["merge", "mergekit", "pave"]
    assert data.base_model == (None if not bases else bases[0] if len(bases) == 1 else bases)
    assert f"]({papers.PAVE.url})" in card.read_text()


def test_split_and_demote():
    meta, body = cards.split_card("---\ntags:\n- merge\n---\n# Title\n\n## A\n```\n# not a heading\n```\n")
    assert meta == {"tags": ["merge"]}
    assert cards.demote(body) == "### A\n```\n# not a heading\n```"
    assert cards.split_card("# no block\n") == ({}, "# no block\n")

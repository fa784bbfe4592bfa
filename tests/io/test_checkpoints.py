"""Reading and writing Hugging Face checkpoint folders (``pave_plugins.io.checkpoints``): which
files hold the weights (as ``from_pretrained`` picks them), the pickle guard, errors naming the
file, and sharded writing that transformers' own loader reads back."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from pave_plugins.io.checkpoints import (
    CheckpointReader,
    PickleCheckpointError,
    ShardedWriter,
    check_model_config,
    load_pretrained,
    refuse_pickle,
    weight_files,
)
from tiny_models import tiny_llama


def tensors(seed: int, n: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.weight": torch.randn(3 + i, 4, generator=g) for i in range(n)}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 1000), n=st.integers(1, 6), shard=st.sampled_from([0, 60, 100, 250, 10**9]))
def test_sharded_writer_round_trips_through_the_reader(tmp_path_factory, seed, n, shard):
    folder = tmp_path_factory.mktemp("shards")
    want = tensors(seed, n)
    writer = ShardedWriter(folder, max_shard_size=shard)
    for k, v in want.items():
        writer.save_tensor(k, v)
    writer.finalize()
    kind, files = weight_files(folder)
    sizes = [t.numel() * t.element_size() for t in want.values()]
    assert kind == "safetensors" and len(files) >= 1
    if len(files) == 1:
        assert files[0].name == "model.safetensors" and not (folder / "model.safetensors.index.json").exists()
    else:  # each shard within the limit unless one tensor alone is bigger
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(sizes) and set(index["weight_map"]) == set(want)
    reader = CheckpointReader(folder)
    assert sorted(reader.names()) == sorted(want)
    for k, v in want.items():
        assert torch.equal(reader.get(k), v)


def test_sharded_output_loads_with_transformers(tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_llama(0)
    writer = ShardedWriter(tmp_path, max_shard_size=20_000)
    for k, v in model.state_dict().items():
        writer.save_tensor(k, v)
    writer.finalize()
    model.config.save_pretrained(tmp_path)
    assert len(weight_files(tmp_path)[1]) > 1
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_the_index_decides_and_a_missing_shard_is_named(tmp_path):
    save_file(tensors(0, 2), str(tmp_path / "model-00001-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "layers.0.weight": "model-00001-of-00002.safetensors", "layers.1.weight": "model-00002-of-00002.safetensors"}}))
    save_file(tensors(1, 1), str(tmp_path / "adapter_model.safetensors"))  # never a weight file
    kind, files = weight_files(tmp_path)
    assert kind == "safetensors" and [f.name for f in files] == ["model-00001-of-00002.safetensors",
                                                                "model-00002-of-00002.safetensors"]
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors: a weight file the folder's index"):
        CheckpointReader(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.safetensors.index.json: not a readable weight index"):
        weight_files(tmp_path)


def test_a_truncated_checkpoint_is_named(tmp_path):
    save_file(tensors(0), str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:40])
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read safetensors checkpoint"):
        CheckpointReader(tmp_path)


def test_pickles_are_refused_unless_allowed(tmp_path):
    model = tiny_llama(0, hidden_size=16, intermediate_size=24, num_attention_heads=2)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "training_args.bin").write_bytes(b"not weights")
    assert weight_files(tmp_path)[0] == "pickle"
    with pytest.raises(PickleCheckpointError, match=r"pytorch_model\.bin.*--allow-pickle"):
        refuse_pickle(tmp_path)
    with pytest.raises(FileNotFoundError, match="pickle checkpoints are not loaded unless you pass --allow-pickle"):
        CheckpointReader(tmp_path)
    reader = CheckpointReader(tmp_path, allow_pickle=True)
    for k, v in model.state_dict().items():
        if k in reader.names():
            assert torch.equal(reader.get(k), v), k
    from transformers import LlamaForCausalLM

    with pytest.raises(PickleCheckpointError):
        load_pretrained(LlamaForCausalLM, tmp_path)
    loaded = load_pretrained(LlamaForCausalLM, tmp_path, allow_pickle=True)
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


def test_a_broken_config_is_named_before_a_loader_reads_it(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json"):
        check_model_config(tmp_path)
    assert weight_files(tmp_path / "absent") == ("none", [])

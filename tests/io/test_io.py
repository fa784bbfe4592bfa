"""Covariance files and atomic outputs: round trip, lookups, corrupt input, nothing half-written."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pave_plugins.io.output import output_file, output_folder
from pave_plugins.io.covariance import (
    CovarianceFile,
    CovarianceFileError,
    CovarianceMetadata,
    save_covariances,
)


def write_example(path):
    c0 = torch.randn(6, 6, dtype=torch.float64)
    c1 = torch.randn(4, 4, dtype=torch.float64)
    meta = CovarianceMetadata(
        layer_map={
            "encoder.layer.0.attention.self.query": "cov.0",
            "encoder.layer.0.attention.self.key": "cov.0",
            "encoder.layer.0.output.dense": "cov.1",
        },
        counts={"cov.0": 10, "cov.1": 10},
        n_samples=3,
        n_tokens=10,
        max_length=16,
        model_path="/models/x",
        model_fingerprint="abc",
    )
    save_covariances(path, {"cov.0": c0 @ c0.T, "cov.1": c1 @ c1.T}, meta)
    return c0 @ c0.T, c1 @ c1.T


def test_round_trip_and_shared_inputs(tmp_path):
    path = tmp_path / "a.safetensors"
    c0, c1 = write_example(path)
    f = CovarianceFile(path)
    assert f.metadata.n_tokens == 10 and f.metadata.max_length == 16
    assert f.metadata.model_fingerprint == "abc"
    assert torch.equal(f.get("encoder.layer.0.attention.self.query"), c0)
    assert torch.equal(f.get("encoder.layer.0.attention.self.key.weight"), c0)
    assert f.key_for("encoder.layer.0.attention.self.query") == f.key_for("encoder.layer.0.attention.self.key")
    # a checkpoint with a model prefix ("bert.") still finds its layer
    assert torch.equal(f.get("bert.encoder.layer.0.output.dense.weight"), c1)
    assert "embeddings.word_embeddings.weight" not in f
    with pytest.raises(CovarianceFileError, match="no covariance for layer 'pooler.dense'"):
        f.get("pooler.dense.weight")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CovarianceFileError, match="not found"):
        CovarianceFile(tmp_path / "nope.safetensors")
    path = tmp_path / "a.safetensors"
    write_example(path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CovarianceFileError, match="truncated.safetensors"):
        CovarianceFile(truncated).get("encoder.layer.0.output.dense")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(CovarianceFileError, match="garbage.safetensors"):
        CovarianceFile(garbage)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(plain))
    with pytest.raises(CovarianceFileError, match="not a pave covariance file"):
        CovarianceFile(plain)


def test_atomic_file_leaves_old_content_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with output_file(target, who="test") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    with output_file(target, who="test") as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"


def test_atomic_directory(tmp_path):
    out = tmp_path / "model"
    with output_folder(out, who="test") as tmp:
        (tmp / "a.txt").write_text("1")
    assert (out / "a.txt").read_text() == "1"
    with pytest.raises(FileExistsError, match="not empty"):
        with output_folder(out, who="test"):
            pass
    with pytest.raises(RuntimeError):
        with output_folder(out, who="test", overwrite=True) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in out.iterdir()) == [".pave-output.json", "a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with output_folder(out, who="test", overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [".pave-output.json", "b.txt"]


def test_save_validates(tmp_path):
    with pytest.raises(ValueError, match="not given"):
        save_covariances(tmp_path / "x.safetensors", {}, CovarianceMetadata(layer_map={"a": "cov.0"}))
    with pytest.raises(ValueError, match="square"):
        save_covariances(
            tmp_path / "x.safetensors", {"cov.0": torch.zeros(2, 3)}, CovarianceMetadata(layer_map={"a": "cov.0"})
        )
    assert not (tmp_path / "x.safetensors").exists()

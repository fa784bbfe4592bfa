"""`pave collect` flags through ``pave_plugins.cli.main``, each checked by its effect on the written
file against an independent reference: the inputs of every ``nn.Linear`` captured by our own
pre-hooks (one text per forward pass, so no padding), summed as ``X^T X`` in float64."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from collect_helpers import (
    TEXTS,
    capture_inputs,
    make_tokenizer,
    save_model_dir,
    tiny_llama,
    write_jsonl,
)
from safetensors.torch import load_file

from pave_plugins.cli import main
from pave_plugins.io.covariance import CovarianceFile

ROWS = [{"text": t, "first": t, "second": " ".join(reversed(t.split()))} for t in TEXTS]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("collect_flags")
    model_dir = save_model_dir(root / "model", tiny_llama(seed=0))
    data = write_jsonl(root / "d.jsonl", ROWS)
    return {"root": root, "model": model_dir, "data": data}


def reference(
    model_dir: Path, texts: list[str], max_length: int = 64, dtype=torch.float32
) -> dict[str, torch.Tensor]:
    """{linear layer: sum over tokens of x x^T} (float64), one text per forward pass."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    tok = make_tokenizer()
    out: dict[str, torch.Tensor] = {}
    for t in texts:
        batch = dict(
            tok([t], return_tensors="pt", truncation=True, max_length=max_length)
        )
        for name, xs in capture_inputs(model, batch).items():
            x = torch.cat([a.reshape(-1, a.shape[-1]) for a in xs]).double()
            out[name] = out.get(name, 0) + x.T @ x
    return out


def collect(setup, out: Path, *extra) -> int:
    args = [
        "collect",
        "--model",
        str(setup["model"]),
        "--data",
        str(setup["data"]),
        "--n-samples",
        "0",
    ]
    return main(
        [
            *args,
            "--batch-size",
            "3",
            "--device",
            "cpu",
            "--no-progress",
            "-o",
            str(out),
            *map(str, extra),
        ]
    )


def assert_matches(
    path: Path, ref: dict[str, torch.Tensor], rtol: float, layers=None
) -> CovarianceFile:
    f = CovarianceFile(path)
    names = set(ref) if layers is None else layers
    assert set(f.metadata.layer_map) == names
    for name in names:
        got = f.get(name).double()
        assert float((got - ref[name]).norm() / ref[name].norm()) < rtol, name
    return f


def test_template_and_split(setup, tmp_path):
    import datasets

    out = tmp_path / "template.safetensors"
    assert collect(setup, out, "--template", "{second} {first}") == 0
    assert_matches(
        out,
        reference(setup["model"], [f"{r['second']} {r['first']}" for r in ROWS]),
        1e-6,
    )
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS[:5]),
            "validation": datasets.Dataset.from_list(ROWS[5:]),
        }
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "split.safetensors"
    args = [
        "collect",
        "--model",
        setup["model"],
        "--data",
        tmp_path / "saved",
        "--split",
        "validation",
    ]
    assert (
        main(
            [
                *map(str, args),
                "--n-samples",
                "0",
                "--device",
                "cpu",
                "--no-progress",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    f = assert_matches(out, reference(setup["model"], TEXTS[5:]), 1e-6)
    assert (
        f.metadata.n_samples == len(TEXTS) - 5
        and f.metadata.extra["split"] == "validation"
    )


def test_tokenizer_flag(setup, tmp_path):
    bare = tmp_path / "bare"
    tiny_llama(seed=0).save_pretrained(bare)  # weights only, no tokenizer files
    tok_dir = tmp_path / "tok"
    make_tokenizer().save_pretrained(tok_dir)
    out = tmp_path / "c.safetensors"
    base = [
        "collect",
        "--model",
        str(bare),
        "--data",
        str(setup["data"]),
        "--n-samples",
        "0",
        "--device",
        "cpu",
    ]
    assert main([*base, "--no-progress", "-o", str(out)]) == 2
    assert not out.exists()
    assert (
        main([*base, "--tokenizer", str(tok_dir), "--no-progress", "-o", str(out)]) == 0
    )
    assert_matches(out, reference(setup["model"], TEXTS), 1e-6)


def test_dtypes(setup, tmp_path):
    ref = reference(setup["model"], TEXTS)
    f64, f32, c32, bf = (
        tmp_path / f"{k}.safetensors" for k in ("f64", "f32", "c32", "bf16")
    )
    assert collect(setup, f64) == 0
    assert collect(setup, f32, "--dtype", "float32") == 0
    assert collect(setup, c32, "--compute-dtype", "float32") == 0
    assert collect(setup, bf, "--model-dtype", "bfloat16") == 0
    a = assert_matches(
        f64, ref, 1e-6
    )  # float32 forward passes, padded batches of 3 against one text
    b = assert_matches(f32, ref, 1e-6)
    c = assert_matches(c32, ref, 1e-6)
    assert a.metadata.dtype == "float64" and b.metadata.dtype == "float32"
    name = "model.layers.0.mlp.down_proj"
    assert a.get(name).dtype == torch.float64 and b.get(name).dtype == torch.float32
    # float32 products, float64 sums: stored in float64, not the float64 result bit for bit
    assert c.get(name).dtype == torch.float64 and not torch.equal(
        c.get(name), a.get(name)
    )
    # a bfloat16 forward pass: the bfloat16 model's own inputs, not the float32 model's
    d = assert_matches(bf, reference(setup["model"], TEXTS, dtype=torch.bfloat16), 1e-6)
    assert d.metadata.extra["model_dtype"] == "bfloat16"
    assert float((d.get(name) - a.get(name)).norm() / a.get(name).norm()) > 1e-4


def test_layers_no_dedupe_accumulate_device_device_map(setup, tmp_path):
    ref = reference(setup["model"], TEXTS)
    whole, only, sep, acc, dmap = (
        tmp_path / f"{k}.safetensors" for k in ("whole", "mlp", "sep", "acc", "dmap")
    )
    assert collect(setup, whole) == 0
    assert collect(setup, only, "--layers", r"mlp\.(up|down)_proj") == 0
    assert collect(setup, sep, "--no-dedupe") == 0
    assert collect(setup, acc, "--accumulate-device", "cpu") == 0
    assert collect(setup, dmap, "--device-map", "cpu") == 0
    w = CovarianceFile(whole)
    mlp = {n for n in ref if n.endswith(("mlp.up_proj", "mlp.down_proj"))}
    assert len(mlp) == 4
    assert_matches(only, ref, 1e-6, layers=mlp)
    # shared inputs: q/k/v and gate/up have one matrix in the default file, one each with --no-dedupe
    n_shared = len(set(w.metadata.layer_map.values()))
    assert n_shared < len(ref)
    s = assert_matches(sep, ref, 1e-6)
    assert len(set(s.metadata.layer_map.values())) == len(ref)
    assert all(torch.equal(s.get(n), w.get(n)) for n in ref)
    for path in (acc, dmap):
        f = assert_matches(path, ref, 1e-6)
        assert all(
            torch.equal(f.get(n), w.get(n)) for n in ref
        )  # the same computation, bit for bit
    assert CovarianceFile(dmap).metadata.extra["device_map"] == "cpu"


def test_overwrite(setup, tmp_path, caplog):
    out = tmp_path / "c.safetensors"
    assert collect(setup, out, "--n-samples", "3") == 0
    before = out.read_bytes()
    with caplog.at_level(logging.ERROR, logger="pave"):
        assert collect(setup, out, "--n-samples", "4") == 2
    assert f"{out} exists (pass --overwrite to replace it)" in caplog.text
    assert out.read_bytes() == before
    assert collect(setup, out, "--n-samples", "4", "--overwrite") == 0
    assert CovarianceFile(out).metadata.n_samples == 4


def test_check_and_merge_allow_fingerprint_mismatch(setup, tmp_path, caplog):
    """A file collected on another model of the same shapes: --check and --merge refuse it, naming
    the fingerprint; with --allow-fingerprint-mismatch they warn and go on."""
    other = save_model_dir(tmp_path / "other", tiny_llama(seed=1))
    mine, theirs = tmp_path / "mine.safetensors", tmp_path / "theirs.safetensors"
    assert collect(setup, mine) == 0
    args = [
        "collect",
        "--model",
        str(other),
        "--data",
        str(setup["data"]),
        "--n-samples",
        "0",
        "--device",
        "cpu",
    ]
    assert main([*args, "--no-progress", "-o", str(theirs)]) == 0
    check = ["collect", "--check", str(theirs), "--model", str(setup["model"])]
    with caplog.at_level(logging.WARNING):
        assert main(check) == 2
        assert "fingerprint" in caplog.text and str(theirs) in caplog.text
        caplog.clear()
        assert main([*check, "--allow-fingerprint-mismatch"]) == 0
        assert "fingerprint" in caplog.text
    merged = tmp_path / "sum.safetensors"
    assert main(["collect", "--merge", str(mine), str(theirs), "-o", str(merged)]) == 2
    assert not merged.exists()
    assert (
        main(
            [
                "collect",
                "--merge",
                str(mine),
                str(theirs),
                "-o",
                str(merged),
                "--allow-fingerprint-mismatch",
            ]
        )
        == 0
    )
    a, b, s = CovarianceFile(mine), CovarianceFile(theirs), CovarianceFile(merged)
    for n in a.metadata.layer_map:
        torch.testing.assert_close(s.get(n), a.get(n) + b.get(n), rtol=1e-12, atol=0)


def test_allow_pickle(setup, tmp_path, caplog):
    pk = tmp_path / "pickle_model"
    shutil.copytree(setup["model"], pk)
    torch.save(load_file(str(pk / "model.safetensors")), pk / "pytorch_model.bin")
    (pk / "model.safetensors").unlink()
    out = tmp_path / "c.safetensors"
    args = [
        "collect",
        "--model",
        str(pk),
        "--data",
        str(setup["data"]),
        "--n-samples",
        "0",
        "--device",
        "cpu",
    ]
    with caplog.at_level(logging.ERROR, logger="pave"):
        assert main([*args, "--no-progress", "-o", str(out)]) == 2
    assert "--allow-pickle" in caplog.text and not out.exists()
    assert main([*args, "--no-progress", "--allow-pickle", "-o", str(out)]) == 0
    assert_matches(out, reference(setup["model"], TEXTS), 1e-6)


def test_progress_bar_unless_no_progress(setup, tmp_path, capsys):
    args = [
        "collect",
        "--model",
        str(setup["model"]),
        "--data",
        str(setup["data"]),
        "--device",
        "cpu",
    ]
    capsys.readouterr()
    assert main([*args, "-o", str(tmp_path / "a.safetensors")]) == 0
    with_bar = capsys.readouterr().err
    assert main([*args, "--no-progress", "-o", str(tmp_path / "b.safetensors")]) == 0
    without = capsys.readouterr().err
    assert "collect covariances" in with_bar
    assert "collect covariances" not in without

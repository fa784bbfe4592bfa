"""`pave rethink` flags through ``pave_plugins.cli.main``, each checked by its effect: calibration
losses recomputed by hand with transformers (lr 0 keeps Lambda = 1, so the recorded loss is the
plain loss of the input merge), spectra of the written weights by an independent SVD, and runs
that must agree with one another."""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from rethink_helpers import (
    build_llama_lora,
    build_seq_cls,
    llama_config,
    perturb_,
    tiny_tokenizer,
    write_jsonl,
)
from safetensors.torch import load_file

from pave_plugins.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def seq_cls(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rethink_flags_cls")
    dirs, calib, _ = build_seq_cls(tmp)
    from transformers import BertForSequenceClassification

    # a confident head: losses then depend visibly on which texts, tokens and labels are fed
    head = BertForSequenceClassification.from_pretrained(dirs["sent"])
    with torch.no_grad():
        head.classifier.weight.mul_(200.0)
    head.save_pretrained(dirs["sent"])
    return {"tmp": tmp, "dirs": dirs, "calib": calib}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rethink_flags_llama")
    adapters, calib = build_llama_lora(tmp, n_adapters=1)
    return {"tmp": tmp, "adapters": adapters, "calib": calib}


def rethink(*args) -> int:
    return main(["rethink", "--no-progress", *map(str, args)])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name != "rethink_lambda.safetensors":
            out.update(load_file(str(f)))
    return out


def recipe(out: Path) -> dict:
    return json.loads((out / "rethink.json").read_text())


def cls_args(s, out: Path, calib: Path, *extra) -> list:
    t = s["tmp"]
    return ["--base", t / "base", "--merged", t / "merged", "--calib", f"sent={calib}",
            "--heads", f"sent={s['dirs']['sent']}", "--out", out, *extra]  # fmt: skip


@functools.cache
def merged_with_head(merged_dir: Path, head_dir: Path):
    """Tokenizer and the merged body with a task's fine-tuned head, loaded by transformers."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(merged_dir)
    merged = BertForSequenceClassification.from_pretrained(merged_dir)
    model = BertForSequenceClassification.from_pretrained(head_dir)
    model.load_state_dict(
        {
            k: v
            for k, v in merged.state_dict().items()
            if not k.startswith("classifier")
        },
        strict=False,
    )
    return tok, model.eval()


def hand_ce(
    s, texts: list[str], labels: list[int], batch_size: int, max_length: int
) -> float:
    """Mean over consecutive batches of the cross-entropy of the merged body + task 'sent' head."""
    tok, model = merged_with_head(s["tmp"] / "merged", s["dirs"]["sent"])
    losses = []
    for i in range(0, len(texts), batch_size):
        enc = tok(
            texts[i : i + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        with torch.no_grad():
            logits = model(**enc).logits
        losses.append(
            float(
                torch.nn.functional.cross_entropy(
                    logits, torch.tensor(labels[i : i + batch_size])
                )
            )
        )
    return sum(losses) / len(losses)


LR0 = ("--lr", "0", "--epochs", "1", "--iterations", "1")


def test_text_label_fields_template_max_length_batch_size(seq_cls, tmp_path):
    s = seq_cls
    rows = [
        json.loads(line) for line in Path(s["calib"]["sent"]).read_text().splitlines()
    ]
    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    renamed = write_jsonl(
        tmp_path / "renamed.jsonl",
        [{"sentence": t, "y": y} for t, y in zip(texts, labels)],
    )
    out = tmp_path / "fields"
    assert rethink(*cls_args(s, out, renamed, "--text-field", "sentence", "--label-field", "y", "--samples", "0",
                             "--batch-size", "5", "--max-length", "3", *LR0)) == 0  # fmt: skip
    assert math.isclose(
        recipe(out)["losses"][0][0], hand_ce(s, texts, labels, 5, 3), rel_tol=1e-5
    )
    # the same records, truncated at 3 tokens, give another loss than at full length
    assert not math.isclose(
        hand_ce(s, texts, labels, 5, 3), hand_ce(s, texts, labels, 5, 64), rel_tol=1e-4
    )
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"a": t, "b": "dog mat", "label": y} for t, y in zip(texts, labels)],
    )
    out = tmp_path / "template"
    assert (
        rethink(
            *cls_args(
                s,
                out,
                pairs,
                "--template",
                "{b} {a}",
                "--samples",
                "0",
                "--batch-size",
                "4",
                *LR0,
            )
        )
        == 0
    )
    templated = [f"dog mat {t}" for t in texts]
    assert math.isclose(
        recipe(out)["losses"][0][0], hand_ce(s, templated, labels, 4, 256), rel_tol=1e-5
    )
    # a field that is not there: exit status 2 and a message naming the file and the field
    assert rethink(*cls_args(s, tmp_path / "bad", renamed, *LR0)) == 2
    assert not (tmp_path / "bad").exists()


def test_samples_and_seed_draw_a_subset(seq_cls, tmp_path):
    """--samples 3 --batch-size 3: one batch, whose loss is that of some 3 of the 12 records (found by
    trying all 220 subsets), not of all of them; another --seed draws another subset."""
    s = seq_cls
    rows = [
        json.loads(line) for line in Path(s["calib"]["sent"]).read_text().splitlines()
    ]
    found = {}
    for seed in (5, 6):
        out = tmp_path / f"seed{seed}"
        assert (
            rethink(
                *cls_args(
                    s,
                    out,
                    s["calib"]["sent"],
                    "--samples",
                    "3",
                    "--batch-size",
                    "3",
                    "--seed",
                    seed,
                    *LR0,
                )
            )
            == 0
        )
        assert recipe(out)["samples_per_task"] == {"sent": 3} and recipe(out)["seed"] == seed
        loss = recipe(out)["losses"][0][0]
        found[seed] = [
            idx for idx in itertools.combinations(range(len(rows)), 3)
            if math.isclose(loss, hand_ce(s, [rows[i]["text"] for i in idx], [rows[i]["label"] for i in idx], 3, 256), rel_tol=1e-5)
        ]  # fmt: skip
        assert found[seed], seed
    assert set(found[5]).isdisjoint(found[6])


def test_malformed_calibration_record(seq_cls, tmp_path, caplog):
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"text": "good movie", "label": 1}, "not an object"]
    )
    with caplog.at_level(logging.ERROR, logger="pave"):
        assert rethink(*cls_args(seq_cls, tmp_path / "out", bad, *LR0)) == 2
    # the one JSON-lines reader takes a bare string for a text row: it then lacks the label
    assert f"calibration file {bad}: row 2 has no field 'label'" in caplog.text
    assert not (tmp_path / "out").exists()


def low_rank_part(delta: torch.Tensor, reference: torch.Tensor, k: int) -> float:
    """Norm of ``delta`` outside the top-k singular subspaces of ``reference``, relative."""
    u, _, vh = torch.linalg.svd(reference.double())
    pu, pv = u[:, :k] @ u[:, :k].T, vh[:k].T @ vh[:k]
    d = delta.double()
    return float((d - pu @ d @ pv).norm() / d.norm())


TRAIN = ("--epochs", "3", "--iterations", "2", "--lr", "0.05")


def test_top_k_keep_tail_redecompose_compute_dtype_device(seq_cls, tmp_path, capsys):
    s = seq_cls
    base, merged = weights(s["tmp"] / "base"), weights(s["tmp"] / "merged")
    runs = {
        "top3": ("--top-k", "3"),
        "top3_tail": ("--top-k", "3", "--keep-tail"),
        "factored": ("--device", "auto"),
        "dense": ("--redecompose", "dense", "--device", "cpu"),
        "float64": ("--compute-dtype", "float64"),
    }
    got = {}
    for key, extra in runs.items():
        out = tmp_path / key
        assert rethink(*cls_args(s, out, s["calib"]["sent"], *TRAIN, *extra)) == 0
        got[key] = weights(out)
        assert len(recipe(out)["losses"]) == 2 and all(
            len(x) == 3 for x in recipe(out)["losses"]
        )
    lam = load_file(str(tmp_path / "top3" / "rethink_lambda.safetensors"))
    assert {v.numel() for k, v in lam.items() if ".lambda." in k} == {3}
    assert recipe(tmp_path / "dense")["redecompose"] == "dense"
    assert recipe(tmp_path / "float64")["compute_dtype"] == "float64"
    changed = 0
    for k, b in base.items():
        if k not in lam and f"{k}.gain" not in lam:
            continue
        d0 = merged[k] - b
        # without --keep-tail the written delta is rank 3 (top-3 subspace of the input delta) ...
        assert low_rank_part(got["top3"][k] - b, d0, 3) < 1e-4, k
        # ... with it, only the top-3 part moved and the tail is the input merge's
        assert low_rank_part(got["top3_tail"][k] - merged[k], d0, 3) < 1e-4, k
        assert float((got["top3"][k] - merged[k]).norm()) > 1e-3 * float(d0.norm())
        changed += not torch.equal(got["top3_tail"][k], merged[k])
        # re-decomposing densely or computing in float64 gives the same result to float32 accuracy
        for other in ("dense", "float64"):
            torch.testing.assert_close(
                got[other][k], got["factored"][k], rtol=1e-4, atol=1e-5
            )
    assert changed > 0
    assert any(not torch.equal(got["float64"][k], got["factored"][k]) for k in merged)
    # a device torch does not know is refused by the parser, naming the flag
    with pytest.raises(SystemExit) as err:
        rethink(*cls_args(s, tmp_path / "nodev", s["calib"]["sent"], *LR0, "--device", "nodevice"))
    assert err.value.code == 2
    assert "argument --device" in capsys.readouterr().err


def test_include_embeddings(tmp_path):
    """A merged causal LM whose embeddings also moved: they are rethought only with the flag."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config())
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer(tmp_path / "base")
    merged = LlamaForCausalLM(llama_config())
    merged.load_state_dict(base.state_dict())
    perturb_(merged, 0.3, seed=3)
    merged.save_pretrained(tmp_path / "merged")
    tiny_tokenizer(tmp_path / "merged")
    calib = write_jsonl(
        tmp_path / "c.jsonl", [{"input": "the cat", "target": "sat on the mat"}] * 4
    )
    emb = ("model.embed_tokens.weight", "lm_head.weight")
    m = weights(tmp_path / "merged")
    for flag in ((), ("--include-embeddings",)):
        out = tmp_path / ("with" if flag else "without")
        args = [
            "--base",
            tmp_path / "base",
            "--merged",
            tmp_path / "merged",
            "--calib",
            calib,
            "--out",
            out,
        ]
        assert rethink(*args, *TRAIN, *flag) == 0
        lam, w = load_file(str(out / "rethink_lambda.safetensors")), weights(out)
        for k in emb:
            assert (f"{k}.lambda.0" in lam) == bool(flag), k
            assert torch.equal(w[k], m[k]) != bool(flag), k
        assert not torch.equal(
            w["model.layers.0.mlp.down_proj.weight"],
            m["model.layers.0.mlp.down_proj.weight"],
        )


def test_task_type_and_input_target_fields(llama, tmp_path, caplog):
    """An architecture the auto-detection does not know is refused, and runs with --task-type; the
    prompt/target columns are read from --input-field/--target-field."""
    t = llama["tmp"]
    odd = tmp_path / "odd_base"
    shutil.copytree(t / "base", odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["architectures"] = ["SomethingUnknown"]
    (odd / "config.json").write_text(json.dumps(cfg))
    rows = [json.loads(line) for line in Path(llama["calib"]).read_text().splitlines()]
    renamed = write_jsonl(
        tmp_path / "qa.jsonl", [{"q": r["input"], "a": r["target"]} for r in rows]
    )
    lora = f"t0={llama['adapters']['t0']}"
    common = ["--lora", lora, "--epochs", "2", "--iterations", "1", "--lr", "0.05"]
    ref = tmp_path / "ref"
    assert (
        rethink("--base", t / "base", "--calib", llama["calib"], *common, "--out", ref)
        == 0
    )
    with caplog.at_level(logging.ERROR, logger="pave"):
        assert (
            rethink(
                "--base",
                odd,
                "--calib",
                llama["calib"],
                *common,
                "--out",
                tmp_path / "x",
            )
            == 2
        )
    assert (
        "cannot tell the task type of architecture ['SomethingUnknown']" in caplog.text
    )
    out = tmp_path / "typed"
    assert rethink("--base", odd, "--calib", renamed, "--input-field", "q", "--target-field", "a",
                   "--task-type", "causal-lm", *common, "--out", out) == 0  # fmt: skip
    assert recipe(out)["task_type"] == "causal-lm"
    assert recipe(out)["losses"][0] == pytest.approx(recipe(ref)["losses"][0], rel=1e-6)
    a, b = weights(ref), weights(out)
    assert a.keys() == b.keys() and all(
        torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a
    )


def test_overwrite_allow_pickle_and_progress(seq_cls, tmp_path, capsys, caplog):
    s = seq_cls
    out = tmp_path / "out"
    assert rethink(*cls_args(s, out, s["calib"]["sent"], "--epochs", "0")) == 0
    with caplog.at_level(logging.ERROR, logger="pave"):
        assert (
            rethink(
                *cls_args(s, out, s["calib"]["sent"], "--epochs", "1", "--lr", "0.05")
            )
            == 2
        )
    assert (
        f"{out} already exists and is not empty (pass --overwrite to replace it)"
        in caplog.text
    )
    assert recipe(out)["epochs"] == 0
    assert (
        rethink(
            *cls_args(
                s,
                out,
                s["calib"]["sent"],
                "--epochs",
                "1",
                "--lr",
                "0.05",
                "--overwrite",
            )
        )
        == 0
    )
    assert recipe(out)["epochs"] == 1
    # a pickle merged checkpoint: refused, then read with --allow-pickle (epochs 0: the input merge)
    pk = tmp_path / "merged_pickle"
    shutil.copytree(s["tmp"] / "merged", pk)
    torch.save(load_file(str(pk / "model.safetensors")), pk / "pytorch_model.bin")
    (pk / "model.safetensors").unlink()
    args = [
        "--base",
        s["tmp"] / "base",
        "--merged",
        pk,
        "--calib",
        s["calib"]["sent"],
        "--epochs",
        "0",
    ]
    assert rethink(*args, "--out", tmp_path / "p0") == 2
    assert rethink(*args, "--allow-pickle", "--out", tmp_path / "p1") == 0
    a, b = weights(s["tmp"] / "merged"), weights(tmp_path / "p1")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # progress bars on stderr unless --no-progress
    capsys.readouterr()
    argv = [
        "rethink",
        *map(str, cls_args(s, tmp_path / "bars", s["calib"]["sent"], *LR0)),
    ]
    assert main(argv) == 0
    assert "rethink iteration" in capsys.readouterr().err

"""`pave collect` end to end: data formats, CLI, adapters, merge of parts, file checks, torchrun-style DP."""

from __future__ import annotations

import copy
import json
import socket
from pathlib import Path

import pytest
import tiny_models
import torch

from collect_helpers import TEXTS, make_tokenizer, save_model_dir, tiny_gpt2, tiny_llama, write_jsonl
from pave_plugins.cli import main as pave
from pave_plugins.io.fit import check_covariance_file
from pave_plugins.collect import (
    DataError,
    collect_covariances,
    collect_to_file,
    load_texts,
    model_fingerprint,
    sum_covariance_files,
    tokenize_batches,
)
from pave_plugins.io.covariance import CovarianceFile, CovarianceFileError

ROWS = [{"text": t, "sentence1": t, "sentence2": " ".join(reversed(t.split())), "label": i % 2} for i, t in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("collect") / "model")


def _reference(model_dir: Path, texts, max_length=16, batch_size=2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    # independent batching: one text per batch, no padding
    batches = [dict(tok([t], return_tensors="pt", truncation=True, max_length=max_length)) for t in texts]
    return collect_covariances(model, batches, progress=False)


def _assert_file_matches(path, ref, tol=1e-6):
    f = CovarianceFile(path)
    assert f.metadata.layer_map == ref.layer_map
    assert f.metadata.n_tokens == ref.n_tokens and f.metadata.n_samples == ref.n_samples
    for name in ref.layer_map:
        a, b = f.get(name), ref.get(name)
        assert float((a - b).norm() / b.norm()) < tol, name
    return f


def test_cli_end_to_end_jsonl(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "covs" / "a.safetensors"
    rc = pave(["collect", "--model", str(model_dir), "--data", str(data), "--text-field", "text", "--n-samples", "5",
               "--seed", "3", "--max-length", "16", "--batch-size", "2", "--device", "auto", "-o", str(out), "--no-progress"])
    assert rc == 0 and out.is_file()
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "peak memory" in printed
    texts = load_texts(data, n_samples=5, seed=3)
    f = _assert_file_matches(out, _reference(model_dir, texts))
    m = f.metadata
    assert m.model_fingerprint == model_fingerprint(model_dir) and m.max_length == 16 and m.dtype == "float64"
    assert m.extra["seed"] == 3 and m.extra["layers"]["lm_head"]["type"] == "Linear"
    assert not [p for p in out.parent.iterdir() if p.name != out.name]  # no temp file left
    # the same output again needs --overwrite
    assert pave(["collect", "--model", str(model_dir), "--data", str(data), "-o", str(out)]) == 2
    # the file fits its model
    assert pave(["collect", "--check", str(out), "--model", str(model_dir)]) == 0


def test_data_formats_and_sampling(tmp_path):
    import csv

    import datasets

    write_jsonl(tmp_path / "d.jsonl", ROWS)
    with (tmp_path / "d.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(ROWS[0]))
        w.writeheader()
        w.writerows(ROWS)
    (tmp_path / "d.txt").write_text("\n".join(TEXTS) + "\n\n")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:5]), "validation": datasets.Dataset.from_list(ROWS[5:])})
    dd.save_to_disk(str(tmp_path / "saved"))
    assert load_texts(tmp_path / "d.jsonl") == TEXTS
    assert load_texts(tmp_path / "d.csv") == TEXTS
    assert load_texts(tmp_path / "d.txt") == TEXTS
    assert load_texts(tmp_path / "saved") == TEXTS[:5]
    assert load_texts(tmp_path / "saved", split="validation") == TEXTS[5:]
    pair = load_texts(tmp_path / "d.csv", template="{sentence1} || {sentence2}")
    assert pair[0] == f"{ROWS[0]['sentence1']} || {ROWS[0]['sentence2']}"
    a = load_texts(tmp_path / "d.jsonl", n_samples=4, seed=1)
    assert a == load_texts(tmp_path / "d.jsonl", n_samples=4, seed=1) and len(set(a)) == 4
    assert a != load_texts(tmp_path / "d.jsonl", n_samples=4, seed=2)
    assert set(a) <= set(TEXTS)
    # batches: right padding, masks, truncation
    batches = tokenize_batches(make_tokenizer("left"), TEXTS, max_length=5, batch_size=3)
    assert sum(int(b["attention_mask"].sum()) for b in batches) == sum(min(5, len(t.split())) for t in TEXTS)
    assert all(b["input_ids"].shape[1] <= 5 for b in batches)
    assert all(bool((b["attention_mask"][:, 0] == 1).all()) for b in batches)  # right padding


def test_bad_inputs_give_clear_errors(model_dir, tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_texts(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_texts(tmp_path / "empty.jsonl")
    write_jsonl(tmp_path / "blank.jsonl", [{"text": "  "}, {"text": ""}])
    with pytest.raises(DataError, match="no non-empty text"):
        load_texts(tmp_path / "blank.jsonl")
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataError, match=r"text field 'sentence' is not a column.*sentence1"):
        load_texts(tmp_path / "d.jsonl", text_field="sentence")
    with pytest.raises(DataError, match=r"template fields \['premise'\]"):
        load_texts(tmp_path / "d.jsonl", template="{premise} {sentence2}")
    write_jsonl(tmp_path / "two.jsonl", [{"a": "x", "b": "y"}])
    with pytest.raises(DataError, match="--text-field"):
        load_texts(tmp_path / "two.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match="line 2"):
        load_texts(tmp_path / "bad.jsonl")
    # through the CLI: exit code 2 and the message in the log
    out = tmp_path / "o.safetensors"
    assert pave(["collect", "--model", str(model_dir), "--data", str(tmp_path / "missing.jsonl"), "-o", str(out)]) == 2
    assert pave(["collect", "--model", str(tmp_path / "no_model"), "--data", str(tmp_path / "d.jsonl"), "-o", str(out)]) == 2
    assert "model directory not found" in caplog.text and "data file not found" in caplog.text
    assert not out.exists()


def test_merge_parts_equals_whole(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    write_jsonl(tmp_path / "p1.jsonl", ROWS[:3])
    write_jsonl(tmp_path / "p2.jsonl", ROWS[3:])
    kw = dict(max_length=16, batch_size=1, device="cpu", progress=False, n_samples=None)
    collect_to_file(model_dir, data, tmp_path / "whole.safetensors", **kw)
    collect_to_file(model_dir, tmp_path / "p1.jsonl", tmp_path / "p1.safetensors", **kw)
    collect_to_file(model_dir, tmp_path / "p2.jsonl", tmp_path / "p2.safetensors", **kw)
    assert pave(["collect", "--merge", str(tmp_path / "p1.safetensors"), str(tmp_path / "p2.safetensors"),
                 "-o", str(tmp_path / "sum.safetensors")]) == 0
    whole, summed = CovarianceFile(tmp_path / "whole.safetensors"), CovarianceFile(tmp_path / "sum.safetensors")
    assert summed.metadata.counts == whole.metadata.counts
    assert (summed.metadata.n_samples, summed.metadata.n_tokens) == (whole.metadata.n_samples, whole.metadata.n_tokens)
    assert summed.metadata.model_fingerprint == whole.metadata.model_fingerprint
    for name in whole.layers:
        torch.testing.assert_close(summed.get(name), whole.get(name), rtol=1e-12, atol=1e-12)
    # parts of different models are refused; a file given twice is refused
    other = save_model_dir(tmp_path / "other", tiny_llama(seed=9))
    collect_to_file(other, tmp_path / "p2.jsonl", tmp_path / "o2.safetensors", **kw)
    with pytest.raises(CovarianceFileError, match="different models"):
        sum_covariance_files([tmp_path / "p1.safetensors", tmp_path / "o2.safetensors"], tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="more than once"):
        sum_covariance_files([tmp_path / "p1.safetensors", tmp_path / "p1.safetensors"], tmp_path / "x.safetensors")


def test_check_file_against_models(model_dir, tmp_path, caplog):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    kw = dict(max_length=16, batch_size=4, device="cpu", progress=False)
    path = tmp_path / "c.safetensors"
    collect_to_file(model_dir, data, path, **kw)
    check_covariance_file(path, model_dir)  # checkpoint directory
    from transformers import AutoModelForCausalLM

    check_covariance_file(path, AutoModelForCausalLM.from_pretrained(model_dir))  # module
    same_shapes = save_model_dir(tmp_path / "same_shapes", tiny_llama(seed=4))
    with pytest.raises(CovarianceFileError, match="fingerprint"):
        check_covariance_file(path, same_shapes)
    check_covariance_file(path, same_shapes, on_fingerprint_mismatch="warn")
    assert "fingerprint" in caplog.text
    wider = tiny_models.tiny_llama(0, vocab_size=40, intermediate_size=24, num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(CovarianceFileError, match="input features"):
        check_covariance_file(path, wider.state_dict())
    # GPT-2: Conv1D weights are in x out; the check reads the layout from the file
    gdir = save_model_dir(tmp_path / "gpt2", tiny_gpt2())
    gpath = tmp_path / "g.safetensors"
    collect_to_file(gdir, data, gpath, **kw)
    check_covariance_file(gpath, gdir)
    assert CovarianceFile(gpath).metadata.extra["layers"]["transformer.h.0.mlp.c_proj"]["weight_layout"] == "in_out"


def test_cli_adapter_matches_merged_model(model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(7)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "up_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged_dir = tmp_path / "merged"
    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged.save_pretrained(merged_dir)
    make_tokenizer().save_pretrained(merged_dir)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "lora.safetensors"
    assert pave(["collect", "--model", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--data", str(data),
                 "--max-length", "16", "--batch-size", "1", "-o", str(out), "--no-progress"]) == 0
    f = _assert_file_matches(out, _reference(merged_dir, TEXTS), tol=1e-5)
    assert f.metadata.model_fingerprint == model_fingerprint(merged_dir)
    check_covariance_file(out, merged_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dp_worker(rank: int, world: int, port: int, model_dir: str, data: str, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cs = collect_to_file(model_dir, data, out, max_length=16, batch_size=1, device="cpu", progress=False)
    with open(f"{out}.rank{rank}.json", "w") as fh:
        json.dump({"n_tokens": cs.n_tokens, "world": cs.stats.get("world_size")}, fh)


def test_data_parallel_gloo_equals_single_process(model_dir, tmp_path, one_thread):
    # the workers run one thread each: so does the reference, or float32 GEMMs split differently
    import torch.multiprocessing as mp

    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    single = tmp_path / "single.safetensors"
    collect_to_file(model_dir, data, single, max_length=16, batch_size=1, device="cpu", progress=False)
    out = tmp_path / "dp.safetensors"
    mp.spawn(_dp_worker, args=(2, _free_port(), str(model_dir), str(data), str(out)), nprocs=2, join=True)
    a, b = CovarianceFile(single), CovarianceFile(out)
    assert a.metadata.layer_map == b.metadata.layer_map and a.metadata.counts == b.metadata.counts
    assert (a.metadata.n_samples, a.metadata.n_tokens) == (b.metadata.n_samples, b.metadata.n_tokens)
    assert b.metadata.extra["world_size"] == 2 and b.metadata.extra["collection"]["world_size"] == 2
    for name in a.layers:
        torch.testing.assert_close(b.get(name), a.get(name), rtol=1e-12, atol=1e-12)
    # every rank got the total
    for r in range(2):
        info = json.loads(Path(f"{out}.rank{r}.json").read_text())
        assert info["n_tokens"] == a.metadata.n_tokens and info["world"] == 2

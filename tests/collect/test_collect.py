"""Covariance collection API: C = X^T X at every linear input, padding, dedupe, sums, PEFT."""

from __future__ import annotations

import copy

import pytest
import torch

from collect_helpers import TEXTS, capture_inputs, make_tokenizer, tiny_bert, tiny_gpt2, tiny_llama
from pave_plugins.collect import CollectionError, collect_covariances, model_fingerprint


def assert_rel(a, b, tol=1e-5):
    """Norm-relative closeness (float32 forward passes of different shapes round differently)."""
    err = float((a - b).norm() / b.norm())
    assert err < tol, err


def _batch(texts, padding_side="right"):
    tok = make_tokenizer(padding_side)
    return dict(tok(texts, return_tensors="pt", padding=True))


def _reference(model, batch):
    """X^T X (float64) per nn.Linear from inputs captured by the test's own hooks, padding rows dropped."""
    mask = batch["attention_mask"].bool()
    ref = {}
    for name, xs in capture_inputs(model, batch).items():
        c = 0
        for x in xs:
            rows = x[mask] if tuple(x.shape[:-1]) == tuple(mask.shape) else x.reshape(-1, x.shape[-1])
            rows = rows.double()
            c = c + rows.T @ rows
        ref[name] = c
    return ref


@pytest.mark.parametrize("factory", [tiny_llama, tiny_bert])
def test_covariance_equals_xtx_of_captured_inputs(factory):
    model = factory()
    batch = _batch(TEXTS[:4])
    assert (batch["attention_mask"] == 0).any()  # the batch has padding
    cs = collect_covariances(model, [batch], progress=False)
    ref = _reference(model, batch)
    assert set(cs.layer_map) == set(ref)
    for name, c in ref.items():
        got = cs.get(name)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, c, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cs.get(name + ".weight"), c, rtol=1e-12, atol=1e-12)
    n_real = int(batch["attention_mask"].sum())
    assert cs.n_tokens == n_real and cs.n_samples == 4
    assert cs.counts[cs.layer_map["model.layers.0.self_attn.q_proj" if factory is tiny_llama
                                  else "bert.encoder.layer.0.attention.self.query"]] == n_real


def test_float32_accumulation_close_to_float64():
    model = tiny_llama()
    batch = _batch(TEXTS[:4])
    c64 = collect_covariances(model, [batch], progress=False)
    c32 = collect_covariances(model, [batch], accumulate_dtype=torch.float32, progress=False)
    assert c32.dtype == "float32"
    for k, c in c64.covariances.items():
        assert c32.covariances[k].dtype == torch.float32
        assert_rel(c32.covariances[k].double(), c, 1e-6)


def test_padding_does_not_change_covariance():
    model = tiny_llama()
    short, long_ = TEXTS[0], TEXTS[3]
    alone = collect_covariances(model, [_batch([short])], progress=False)
    long_alone = collect_covariances(model, [_batch([long_])], progress=False)
    together = collect_covariances(model, [_batch([short, long_])], progress=False)  # short is padded
    assert together.n_tokens == alone.n_tokens + long_alone.n_tokens
    summed = alone + long_alone
    for k in together.covariances:
        assert_rel(together.covariances[k], summed.covariances[k])
    # the same text padded to different lengths
    tok = make_tokenizer()
    for pad_to in (8, 16):
        b = dict(tok([short], return_tensors="pt", padding="max_length", max_length=pad_to))
        padded = collect_covariances(model, [b], progress=False)
        for k in alone.covariances:
            assert_rel(padded.covariances[k], alone.covariances[k])


def test_dedupe_map_llama_block():
    cs = collect_covariances(tiny_llama(layers=1), [_batch(TEXTS[:2])], progress=False)
    lm = cs.layer_map
    p = "model.layers.0."
    assert lm[p + "self_attn.q_proj"] == lm[p + "self_attn.k_proj"] == lm[p + "self_attn.v_proj"]
    assert lm[p + "mlp.gate_proj"] == lm[p + "mlp.up_proj"]
    distinct = {lm[p + "self_attn.q_proj"], lm[p + "self_attn.o_proj"], lm[p + "mlp.gate_proj"],
                lm[p + "mlp.down_proj"], lm["lm_head"]}
    assert len(distinct) == 5
    assert len(cs.covariances) == 5 and set(cs.covariances) == set(lm.values())
    assert cs.get(p + "mlp.down_proj").shape == (24, 24)


def test_dedupe_map_bert_block():
    cs = collect_covariances(tiny_bert(), [_batch(TEXTS[:2])], progress=False)
    lm = cs.layer_map
    p = "bert.encoder.layer.0."
    assert lm[p + "attention.self.query"] == lm[p + "attention.self.key"] == lm[p + "attention.self.value"]
    others = [p + "attention.output.dense", p + "intermediate.dense", p + "output.dense", "bert.pooler.dense", "classifier"]
    keys = [lm[p + "attention.self.query"]] + [lm[o] for o in others]
    assert len(set(keys)) == len(keys)
    assert cs.counts[lm["classifier"]] == 2  # pooled: one row per sample


def test_no_dedupe_gives_same_values():
    model, batch = tiny_llama(layers=1), _batch(TEXTS[:3])
    a = collect_covariances(model, [batch], progress=False)
    b = collect_covariances(model, [batch], progress=False, dedupe=False)
    assert len(b.covariances) == len(b.layer_map) > len(a.covariances)
    for name in a.layer_map:
        torch.testing.assert_close(a.get(name), b.get(name), rtol=0, atol=0)


def test_gpt2_conv1d_recorded_in_out():
    model = tiny_gpt2()
    batch = _batch(TEXTS[:3])
    cs = collect_covariances(model, [batch], progress=False)
    info = cs.layer_info["transformer.h.0.attn.c_attn"]
    assert info["type"] == "Conv1D" and info["weight_layout"] == "in_out" and info["in_features"] == 16
    assert cs.get("transformer.h.0.mlp.c_proj").shape == (64, 64)
    # independent reference for a Conv1D: capture its input with our own hook
    mask = batch["attention_mask"].bool()
    got = {}
    h = model.transformer.h[0].mlp.c_proj.register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0].clone()))
    with torch.no_grad():
        model(**batch)
    h.remove()
    rows = got["x"][mask].double()
    torch.testing.assert_close(cs.get("transformer.h.0.mlp.c_proj"), rows.T @ rows, rtol=1e-12, atol=1e-12)


def test_sum_of_parts_equals_whole():
    model = tiny_llama()
    b1, b2, b3 = _batch(TEXTS[:3]), _batch(TEXTS[3:5]), _batch(TEXTS[5:])
    whole = collect_covariances(model, [b1, b2, b3], progress=False)
    parts = collect_covariances(model, [b1], progress=False) + collect_covariances(model, [b2, b3], progress=False)
    assert parts.n_tokens == whole.n_tokens and parts.n_samples == whole.n_samples == len(TEXTS)
    assert parts.counts == whole.counts
    for k in whole.covariances:
        torch.testing.assert_close(parts.covariances[k], whole.covariances[k], rtol=1e-12, atol=1e-12)


def test_peft_lora_covariance_matches_merged_model():
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(seed=1)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     init_lora_weights=False, lora_dropout=0.0)
    torch.manual_seed(3)
    peft_model = get_peft_model(copy.deepcopy(base), cfg).eval()
    batch = _batch(TEXTS[:4])
    got = collect_covariances(peft_model, [batch], progress=False)
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    ref = collect_covariances(merged, [batch], progress=False)
    merged_names = {n for n, m in merged.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(got.layer_map) == merged_names == set(ref.layer_map)
    assert got.layer_map == ref.layer_map
    for name in ref.layer_map:
        assert_rel(got.get(name), ref.get(name))
    # the adapter changes the inputs downstream: the base model's covariance differs
    plain = collect_covariances(base, [batch], progress=False)
    assert not torch.allclose(plain.get("model.layers.1.self_attn.q_proj"), got.get("model.layers.1.self_attn.q_proj"))


def test_layer_filter_and_errors():
    model = tiny_llama(layers=1)
    cs = collect_covariances(model, [_batch(TEXTS[:2])], progress=False, layer_filter=r"mlp\.")
    assert set(cs.layer_map) == {f"model.layers.0.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")}
    with pytest.raises(CollectionError, match="no linear layer"):
        collect_covariances(model, [_batch(TEXTS[:2])], progress=False, layer_filter="nothing-matches")
    with pytest.raises(CollectionError, match="no covariance was collected"):
        collect_covariances(model, [], progress=False)
    with pytest.raises(CollectionError, match="batch must be"):
        collect_covariances(model, ["a text"], progress=False)
    with pytest.raises(ValueError, match="no covariance for layer"):
        cs.get("model.layers.0.self_attn.q_proj")


def test_save_roundtrip_and_fingerprint(tmp_path):
    from pave_plugins.io.covariance import CovarianceFile

    model = tiny_llama()
    cs = collect_covariances(model, [_batch(TEXTS[:4])], progress=False)
    fp = model_fingerprint(model)
    out = cs.save(tmp_path / "c.safetensors", model_path="/m", model_fingerprint=fp, max_length=32)
    f = CovarianceFile(out)
    assert f.metadata.model_fingerprint == fp and f.metadata.n_tokens == cs.n_tokens
    assert f.metadata.layer_map == cs.layer_map and f.metadata.max_length == 32
    assert f.metadata.extra["layers"]["lm_head"]["weight_layout"] == "out_in"
    for name in cs.layer_map:
        torch.testing.assert_close(f.get(name), cs.get(name), rtol=0, atol=0)
    # fingerprint: deterministic, same for the saved directory (tied/untied names, bf16 copy), differs for other weights
    model.save_pretrained(tmp_path / "m")
    assert model_fingerprint(tmp_path / "m") == fp == model_fingerprint(model.state_dict())
    assert model_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) == fp
    assert model_fingerprint(tiny_llama(seed=5)) != fp


def test_peft_bert_with_modules_to_save_names_match_merged():
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS",
                     init_lora_weights=False)
    torch.manual_seed(2)
    peft_model = get_peft_model(tiny_bert(), cfg).eval()
    batch = _batch(TEXTS[:3])
    got = collect_covariances(peft_model, [batch], progress=False)
    ref = collect_covariances(copy.deepcopy(peft_model).merge_and_unload().eval(), [batch], progress=False)
    assert got.layer_map == ref.layer_map and "classifier" in got.layer_map
    for name in ref.layer_map:
        assert_rel(got.get(name), ref.get(name))

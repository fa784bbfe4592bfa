"""`pave rethink` on tiny Hugging Face models built in code: sequence classifiers with per-task
heads, a causal LM from PEFT LoRA adapters (fast path), seq2seq; checked against hand computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pave_plugins.cli import main
from pave_plugins.rethink import build_batches, load_lora_adapter

from rethink_helpers import build_llama_lora, build_seq_cls, tiny_tokenizer, write_jsonl


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def seq_cls(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seqcls")
    return tmp, *build_seq_cls(tmp)


@pytest.fixture(scope="module")
def llama_lora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama")
    return tmp, *build_llama_lora(tmp)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name != "rethink_lambda.safetensors":
            out.update(load_file(str(f)))
    return out


def _cli(*args) -> None:
    assert main(["rethink", "--no-progress", *map(str, args)]) == 0


def test_seq_cls_epochs_zero_is_bit_exact_and_writes_card(seq_cls, tmp_path):
    tmp, dirs, calib, _ = seq_cls
    out = tmp_path / "out"
    _cli("--base", tmp / "base", "--merged", tmp / "merged", "--calib", f"sent={calib['sent']}", f"topic={calib['topic']}",
         "--heads", f"sent={dirs['sent']}", f"topic={dirs['topic']}", "--epochs", "0", "--out", out)
    a, b = _weights(tmp / "merged"), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card = (out / "README.md").read_text()
    assert "\n# out\n" in card and "# merged by mergekit" not in card  # its own title, the input's card a stage
    assert "## Stage 1: the input merge" in card and "some card" in card and "## Stage 2: LoRA-DV" in card
    lam = load_file(str(out / "rethink_lambda.safetensors"))
    key = "bert.encoder.layer.0.attention.self.query.weight.lambda.0"
    assert key in lam and bool((lam[key] == 1).all()) and lam[key].numel() == 16
    assert not any("embeddings" in k or "classifier" in k for k in lam)
    recipe = json.loads((out / "rethink.json").read_text())
    assert recipe["changed_layers"] == 0 and recipe["layers"] == 2 * 6 + 1  # 6 linears per layer + pooler
    with pytest.raises(FileExistsError):
        from pave_plugins.core.rethink import RethinkConfig
        from pave_plugins.rethink import RethinkJob, run_job

        run_job(RethinkJob(base=str(tmp / "base"), merged=str(tmp / "merged"), calib=calib, out=str(out),
                           config=RethinkConfig(epochs=0)))


def test_seq_cls_each_task_uses_its_own_head(seq_cls, tmp_path):
    """lr 0: Lambda stays 1, so the first epoch's loss is the plain CE of the merged body with each
    task's fine-tuned head, computed here by hand with transformers."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    tmp, dirs, calib, fts = seq_cls
    out = tmp_path / "out"
    _cli("--base", tmp / "base", "--merged", tmp / "merged", "--calib", f"sent={calib['sent']}", f"topic={calib['topic']}",
         "--heads", f"sent={dirs['sent']}", f"topic={dirs['topic']}", "--epochs", "1", "--iterations", "1", "--lr", "0",
         "--batch-size", "8", "--out", out)
    recipe = json.loads((out / "rethink.json").read_text())
    tok = AutoTokenizer.from_pretrained(tmp / "merged")
    merged = BertForSequenceClassification.from_pretrained(tmp / "merged")
    losses = []
    for task in ("sent", "topic"):
        model = BertForSequenceClassification.from_pretrained(dirs[task])
        sd = {k: v for k, v in merged.state_dict().items() if not k.startswith("classifier")}
        model.load_state_dict(sd, strict=False)
        model.eval()
        recs = [json.loads(l) for l in Path(calib[task]).read_text().splitlines()]
        for s in range(0, len(recs), 8):
            chunk = recs[s : s + 8]
            enc = tok([r["text"] for r in chunk], padding=True, return_tensors="pt")
            with torch.no_grad():
                logits = model(**enc).logits
            losses.append(float(torch.nn.functional.cross_entropy(logits, torch.tensor([r["label"] for r in chunk]))))
    assert math.isclose(recipe["losses"][0][0], sum(losses) / len(losses), rel_tol=1e-5)
    a, b = _weights(tmp / "merged"), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)  # lr 0: Lambda exactly 1, weights untouched


def test_seq_cls_training_changes_only_spectra(seq_cls, tmp_path):
    from transformers import AutoModelForSequenceClassification

    tmp, dirs, calib, _ = seq_cls
    out = tmp_path / "out"
    _cli("--base", tmp / "base", "--merged", tmp / "merged", "--calib", calib["sent"], calib["topic"],
         "--heads", f"sent={dirs['sent']}", f"topic={dirs['topic']}", "--epochs", "4", "--iterations", "2",
         "--lr", "0.05", "--out", out)
    recipe = json.loads((out / "rethink.json").read_text())
    assert recipe["losses"][-1][-1] < recipe["losses"][0][0]
    model = AutoModelForSequenceClassification.from_pretrained(out)  # loadable
    base, merged, new = _weights(tmp / "base"), _weights(tmp / "merged"), _weights(out)
    for k in merged:
        if "embeddings" in k or "classifier" in k or merged[k].ndim != 2:
            assert torch.equal(merged[k], new[k]), k
    lam = load_file(str(out / "rethink_lambda.safetensors"))
    name = "bert.encoder.layer.1.output.dense.weight"
    d0 = (merged[name] - base[name]).double()
    u, s, vh = torch.linalg.svd(d0, full_matrices=False)
    gain = lam[f"{name}.gain"].double()
    torch.testing.assert_close((new[name] - base[name]).double(), (u * (gain * s)) @ vh, rtol=0, atol=1e-5)
    # the gain is the product of the two iterations' Lambdas (matched by singular value)
    assert not torch.allclose(gain, torch.ones_like(gain))
    assert sum(p.numel() for p in model.parameters()) > 0


def test_lora_epochs_zero_matches_hand_merge_and_peft(llama_lora, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    tmp, adapters, calib = llama_lora
    out = tmp_path / "out"
    _cli("--base", tmp / "base", "--lora", f"t0={adapters['t0']}", f"t1={adapters['t1']}", "--lora-weights", "0.5", "-0.25",
         "--calib", calib, "--epochs", "0", "--out", out)
    base, new = _weights(tmp / "base"), _weights(out)
    expected = {k: v.clone() for k, v in base.items()}
    for w, name in ((0.5, "lora0"), (-0.25, "lora1")):
        cfg = json.loads((tmp / name / "adapter_config.json").read_text())
        t = load_file(str(tmp / name / "adapter_model.safetensors"))
        for k, a in t.items():
            if "lora_A" in k:
                b = t[k.replace("lora_A", "lora_B")]
                wname = k.split(".lora_A")[0].removeprefix("base_model.model.") + ".weight"
                expected[wname] = expected[wname] + w * cfg["lora_alpha"] / cfg["r"] * (b @ a)
    assert expected.keys() == new.keys()
    for k in expected:
        torch.testing.assert_close(new[k], expected[k], rtol=0, atol=1e-6)
    # one adapter with weight 1 == PEFT's own merge_and_unload
    out1 = tmp_path / "out1"
    _cli("--base", tmp / "base", "--lora", f"t0={adapters['t0']}", "--calib", calib, "--epochs", "0", "--out", out1)
    ref = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp / "base"), str(adapters["t0"])).merge_and_unload()
    got = _weights(out1)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)


def test_lora_training_uses_fast_path_and_lowers_loss(llama_lora, tmp_path):
    tmp, adapters, calib = llama_lora
    out = tmp_path / "out"
    _cli("--base", tmp / "base", "--lora", f"t0={adapters['t0']}", f"t1={adapters['t1']}", "--lora-weights", "1", "1",
         "--calib", calib, "--epochs", "5", "--iterations", "2", "--lr", "0.05", "--batch-size", "4", "--out", out)
    recipe = json.loads((out / "rethink.json").read_text())
    assert recipe["layers"] == recipe["low_rank_layers"] == 2 * 3
    assert recipe["losses"][-1][-1] < recipe["losses"][0][0]
    lam = load_file(str(out / "rethink_lambda.safetensors"))
    assert lam["model.layers.0.self_attn.q_proj.weight.lambda.0"].numel() == 5  # LoRA ranks 2 + 3
    base, new = _weights(tmp / "base"), _weights(out)
    assert torch.equal(base["model.layers.0.self_attn.k_proj.weight"], new["model.layers.0.self_attn.k_proj.weight"])
    # the rethought delta has rank <= 5: spectra live in the LoRA subspace
    d = (new["model.layers.0.self_attn.q_proj.weight"] - base["model.layers.0.self_attn.q_proj.weight"]).double()
    sv = torch.linalg.svdvals(d)
    assert float(sv[5:].max()) < 1e-5 * float(sv[0])


def test_causal_merged_dense_entropy_and_scalar(llama_lora, tmp_path):
    """A dense merged causal LM, no targets (entropy over the input tokens), scalar ablation."""
    from transformers import LlamaForCausalLM

    tmp, adapters, _ = llama_lora
    merged_dir = tmp_path / "merged"
    _cli("--base", tmp / "base", "--lora", f"t0={adapters['t0']}", "--calib", tmp / "gen.jsonl", "--epochs", "0", "--out", merged_dir)
    calib = write_jsonl(tmp_path / "unl.jsonl", [{"input": "the cat sat on the mat"}, {"input": "a good movie"}])
    out = tmp_path / "out"
    _cli("--base", tmp / "base", "--merged", merged_dir, "--calib", calib, "--loss", "entropy", "--mode", "scalar",
         "--epochs", "3", "--iterations", "1", "--lr", "0.05", "--out", out)
    recipe = json.loads((out / "rethink.json").read_text())
    assert recipe["low_rank_layers"] == 0 and recipe["layers"] == 2 * 3  # zero-delta layers skipped
    assert recipe["losses"][0][-1] < recipe["losses"][0][0]
    base, merged, new = _weights(tmp / "base"), _weights(merged_dir), _weights(out)
    k = "model.layers.1.self_attn.v_proj.weight"
    d0, d1 = merged[k] - base[k], new[k] - base[k]
    c = float((d1 * d0).sum() / (d0 * d0).sum())
    torch.testing.assert_close(d1, c * d0, rtol=0, atol=1e-6)
    LlamaForCausalLM.from_pretrained(out)


def test_seq2seq_t5_ce(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    tiny_tokenizer(tmp_path / "base")
    cfg = T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=4)
    torch.manual_seed(0)
    base = T5ForConditionalGeneration(cfg)
    base.save_pretrained(tmp_path / "base")
    merged = T5ForConditionalGeneration(cfg)
    merged.load_state_dict(base.state_dict())
    with torch.no_grad():
        for n, p in merged.named_parameters():
            if p.ndim == 2 and "shared" not in n:
                p.add_(0.1 * torch.randn_like(p))
    merged.save_pretrained(tmp_path / "merged")
    calib = write_jsonl(tmp_path / "qa.jsonl", [{"input": "the cat", "target": "yes"}, {"input": "a dog", "target": "no"}])
    out = tmp_path / "out"
    _cli("--base", tmp_path / "base", "--merged", tmp_path / "merged", "--calib", calib, "--epochs", "3",
         "--iterations", "1", "--lr", "0.05", "--out", out)
    recipe = json.loads((out / "rethink.json").read_text())
    assert recipe["task_type"] == "seq2seq" and recipe["losses"][0][-1] < recipe["losses"][0][0]
    T5ForConditionalGeneration.from_pretrained(out)


def test_build_batches_template_labels_and_errors(tmp_path):
    tok = tiny_tokenizer(tmp_path / "tok")
    recs = [{"s1": "good movie", "s2": "the plot", "label": "pos"}, {"s1": "bad", "s2": "awful", "label": "neg"}]
    (b,) = build_batches("t", recs, tok, "seq-cls", template="{s1} [SEP] {s2}", label2id={"neg": 0, "pos": 1})
    assert b["labels"].tolist() == [1, 0] and b["task"] == "t"
    assert tok.convert_ids_to_tokens(b["input_ids"][0].tolist())[:6] == ["[CLS]", "good", "movie", "[SEP]", "the", "plot"]
    with pytest.raises(ValueError, match="label 'pos'"):
        build_batches("t", recs, tok, "seq-cls", template="{s1}")
    with pytest.raises(ValueError, match="missing field 'text'"):
        build_batches("t", recs, tok, "seq-cls")
    with pytest.raises(ValueError, match="missing field 'target'"):
        build_batches("t", [{"input": "a"}], tok, "causal-lm", loss="ce")
    (c,) = build_batches("t", [{"input": "the cat", "target": "sat on"}], tok, "causal-lm")
    # [CLS] the cat | sat on </s>: loss on the target tokens only
    assert c["labels"].tolist() == [[-100, -100, -100, *tok.convert_tokens_to_ids(["sat", "on", "</s>"])]]
    assert c["input_ids"].tolist() == [tok.convert_tokens_to_ids(["[CLS]", "the", "cat", "sat", "on", "</s>"])]
    with pytest.raises(FileNotFoundError, match="PEFT adapter"):
        load_lora_adapter(tmp_path)
    # a malformed calibration record through `pave rethink`: test_cli_rethink_flags.py


def test_gpt2_conv1d_lora_fan_in_fan_out_matches_peft(tmp_path):
    """GPT-2 stores Conv1D weights as (in, out): PEFT's fan_in_fan_out adapters are transposed."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2LMHeadModel

    from rethink_helpers import WORDS
    from tiny_models import tiny_gpt2_config

    torch.manual_seed(0)
    cfg = tiny_gpt2_config(vocab_size=len(WORDS) + 5, n_positions=32, eos_token_id=4, bos_token_id=2)
    base = GPT2LMHeadModel(cfg)
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer(tmp_path / "base")
    pm = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                        LoraConfig(r=2, lora_alpha=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    pm.save_pretrained(tmp_path / "lora")
    calib = write_jsonl(tmp_path / "g.jsonl", [{"input": "the cat", "target": "sat"}] * 4)
    out = tmp_path / "out"
    _cli("--base", tmp_path / "base", "--lora", f"t={tmp_path / 'lora'}", "--calib", calib, "--epochs", "0", "--out", out)
    ref = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), str(tmp_path / "lora")).merge_and_unload()
    got = _weights(out)
    assert "transformer.h.0.attn.c_attn.weight" in got and "transformer.h.0.mlp.c_fc.weight" in got
    assert not torch.equal(got["transformer.h.0.attn.c_attn.weight"], base.state_dict()["transformer.h.0.attn.c_attn.weight"])
    for k, v in ref.state_dict().items():
        if k in got:
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)
    out2 = tmp_path / "out2"
    _cli("--base", tmp_path / "base", "--lora", f"t={tmp_path / 'lora'}", "--calib", calib, "--epochs", "2",
         "--iterations", "1", "--lr", "0.05", "--out", out2)
    recipe = json.loads((out2 / "rethink.json").read_text())
    assert recipe["low_rank_layers"] == 2 and recipe["losses"][0][-1] < recipe["losses"][0][0]


def test_cli_tokenizer_flag_and_error_naming_it(seq_cls, tmp_path, caplog):
    tmp, dirs, calib, _ = seq_cls
    # fine-tuned folders without tokenizer files: the error names the flag that fixes it
    args = ["rethink", "--no-progress", "--base", str(dirs["sent"]), "--merged", str(dirs["topic"]),
            "--calib", f"sent={calib['sent']}", "--epochs", "0"]
    assert main([*args, "--out", str(tmp_path / "no_tok")]) == 2
    assert "no tokenizer found in" in caplog.text and "pass --tokenizer DIR" in caplog.text
    assert not (tmp_path / "no_tok").exists()
    out = tmp_path / "with_tok"
    assert main([*args, "--tokenizer", str(tmp / "tok"), "--out", str(out)]) == 0
    recipe = json.loads((out / "rethink.json").read_text())
    assert recipe["tokenizer"] == str(tmp / "tok")
    # the recipe and the model card say how many records were used (12 in the file, --samples 32)
    assert recipe["samples_per_task"] == {"sent": 12}
    assert "(12 samples per task)" in (out / "README.md").read_text()

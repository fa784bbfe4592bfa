"""FusionBench algorithm pave/rethink (LoRA-DV after any merge) through the Python API."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from fusion_bench import BaseModelPool
from fusion_bench.method import TaskArithmeticAlgorithm

from pave_plugins.fusion_bench.rethink import RethinkConfigError, SpectralRethinking

from rethink_helpers import toy_pool_models, toy_xy


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    return toy_pool_models()


def _pool(base, fts):
    val = {t: OmegaConf.create({"_target_": "rethink_helpers.toy_dataset", "task": t, "n": 32}) for t in fts}
    return BaseModelPool(
        {"_pretrained_": copy.deepcopy(base), **{k: copy.deepcopy(v) for k, v in fts.items()}}, val_datasets=val
    )


def _calib_ce(model):
    tot = 0.0
    with torch.no_grad():
        for t in ("a", "b"):
            x, y = toy_xy(t, 32)
            tot += float(torch.nn.functional.cross_entropy(model(x), y))
    return tot / 2


def test_epochs_zero_is_the_inner_merge_bit_exact(models):
    base, fts = models
    ref = TaskArithmeticAlgorithm(scaling_factor=0.5).run(_pool(base, fts))
    algo = SpectralRethinking(inner={"name": "task_arithmetic", "scaling_factor": 0.5}, epochs=0)
    out = algo.run(_pool(base, fts))
    for k, v in ref.state_dict().items():
        assert torch.equal(v, out.state_dict()[k]), k
    assert algo.last_result.changed == [] and algo.last_report["layers"] == 3


def test_rethinking_lowers_calibration_loss_keeps_singular_bases(models, tmp_path):
    base, fts = models
    ta = TaskArithmeticAlgorithm(scaling_factor=1.0).run(_pool(base, fts))
    ref = {k: v.detach().clone() for k, v in ta.state_dict().items()}
    lam_path = tmp_path / "lam.safetensors"
    algo = SpectralRethinking(inner={"name": "task_arithmetic", "scaling_factor": 1.0}, iterations=2, epochs=10,
                              lr=0.02, lambda_save_path=str(lam_path), report_path=str(tmp_path / "r.json"))
    out = algo.run(_pool(base, fts))
    assert _calib_ce(out) < _calib_ce(ta) - 0.02
    for name in ("fc1.weight", "fc2.weight", "head.weight"):
        d0 = (ref[name] - base.state_dict()[name]).double()
        d1 = (out.state_dict()[name] - base.state_dict()[name]).double()
        u, s, vh = torch.linalg.svd(d0, full_matrices=False)
        core = u.T @ d1 @ vh.T
        assert float((core - torch.diag(torch.diagonal(core))).abs().max()) < 1e-5 * float(s[0])
    for name in ("fc1.bias", "fc2.bias", "head.bias"):
        assert torch.equal(ref[name], out.state_dict()[name])
    lam = load_file(str(lam_path))
    assert lam["fc1.weight.lambda.1"].numel() == 8 and (tmp_path / "r.json").is_file()


def test_entropy_and_ablation_modes_run(models):
    base, fts = models
    ta = TaskArithmeticAlgorithm(scaling_factor=1.0).run(_pool(base, fts))

    def ent(m):
        with torch.no_grad():
            p = torch.softmax(torch.cat([m(toy_xy(t, 32)[0]) for t in ("a", "b")]), -1)
        return float(-(p * p.log()).sum(-1).mean())

    out = SpectralRethinking(inner={"name": "task_arithmetic", "scaling_factor": 1.0}, loss="entropy", iterations=1,
                             epochs=10, lr=0.02).run(_pool(base, fts))
    assert ent(out) < ent(ta)
    algo = SpectralRethinking(inner={"name": "task_arithmetic", "scaling_factor": 1.0}, mode="scalar", iterations=1, epochs=2)
    algo.run(_pool(base, fts))
    assert all(v.numel() == 1 for v in algo.last_result.lambdas[0].values())


def test_hydra_configs_and_errors():
    import fusion_bench

    for name, loss, lr in (("pave/rethink", "ce", 0.005), ("pave/rethink_entropy", "entropy", 0.005), ("pave/rethink_llm", "ce", 1e-4)):
        cfg = fusion_bench.initialize_hydra_config("fabric_model_fusion", overrides=[f"method={name}", "~taskpool"])
        algo = fusion_bench.instantiate(cfg.method)
        assert isinstance(algo, SpectralRethinking) and algo.loss == loss and algo.lr == lr and algo.n_samples == 32
        assert OmegaConf.to_container(algo.config)["iterations"] == 3
    with pytest.raises(RethinkConfigError, match="loss"):
        SpectralRethinking(loss="mse")
    with pytest.raises(RethinkConfigError, match="mode"):
        SpectralRethinking(mode="foo")
    base, fts = toy_pool_models()
    with pytest.raises(RethinkConfigError, match="no val datasets"):
        SpectralRethinking(epochs=1).run(BaseModelPool({"_pretrained_": base, **fts}))


def test_compute_loss_matches_transformers_own_losses():
    """Dict batches (FusionBench HF pools): CE equals the model's own loss; entropy by hand."""
    from transformers import BertForSequenceClassification, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    from pave_plugins.core.rethink import Forward
    from rethink_helpers import bert_config, llama_config

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    algo = SpectralRethinking(loss="ce")
    ent_algo = SpectralRethinking(loss="entropy")
    ids = torch.randint(5, 25, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    # causal LM: labels with -100 on the prompt
    lm = LlamaForCausalLM(llama_config()).eval()
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        ref = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
        got = algo.compute_loss(Forward(lm, {}), {"input_ids": ids, "attention_mask": mask, "labels": labels}, "t")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # seq2seq (Flan-T5 style): labels padded with the pad id
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=30, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                             decoder_start_token_id=0, pad_token_id=0)).eval()
    tl = torch.tensor([[7, 8, 1], [9, 1, 0], [5, 1, 0]])
    with torch.no_grad():
        ref = t5(input_ids=ids, attention_mask=mask, labels=tl.masked_fill(tl == 0, -100)).loss
        got = algo.compute_loss(Forward(t5, {}), {"input_ids": ids, "attention_mask": mask, "labels": tl}, "t")
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        first = t5(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.zeros(3, 1, dtype=torch.long)).logits[:, 0]
        p = torch.softmax(first, -1)
        got = ent_algo.compute_loss(Forward(t5, {}), {"input_ids": ids, "attention_mask": mask}, "t")
        torch.testing.assert_close(got, -(p * p.log()).sum(-1).mean(), rtol=1e-5, atol=1e-6)
    # sequence classifier
    bert = BertForSequenceClassification(bert_config(3)).eval()
    y = torch.tensor([0, 2, 1])
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask, labels=y).loss
        got = algo.compute_loss(Forward(bert, {}), {"input_ids": ids, "attention_mask": mask, "labels": y}, "t")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_model_card_and_outputs_with_a_program(models, tmp_path):
    from types import SimpleNamespace

    base, fts = models
    pool = _pool(base, fts)
    algo = SpectralRethinking(inner="task_arithmetic", iterations=1, epochs=1, report_path=str(tmp_path / "rep.json"))
    algo._program = SimpleNamespace(merged_model_save_path=str(tmp_path / "merged"), modelpool=pool, config=None, log_dir=str(tmp_path))
    algo.run(pool)
    card = (tmp_path / "README.md").read_text()  # BaseModelPool saves one file: the card lies beside it
    assert "LoRA-DV" in card and "pave/rethink" in card and "inner: task_arithmetic" in card
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["layers"] == 3 and len(rep["losses"]) == 1
    assert (tmp_path / "rethink_lambda.safetensors").is_file()  # default: <log_dir>/

"""FusionBench ``pave/rethink`` with ``method.calibration=<file.jsonl>`` (as ``pave rethink --calib``):
the same rethought weights as ``pave rethink`` on the inner method's merge with the same files; every
file checked before the inner method merges (a bad record, a missing file, no tokenizer: one line
naming ``method.calibration``); the pool's missing validation datasets, too, before the merge."""

from __future__ import annotations

import pytest
import torch
from fusion_bench.method import TaskArithmeticAlgorithm
from fusion_bench.modelpool import CausalLMPool
from rethink_helpers import llama_config, perturb_, random_sentences, tiny_tokenizer, write_jsonl

from pave_plugins.cli import main
from pave_plugins.fusion_bench.rethink import RethinkConfigError, SpectralRethinking

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("fb_calib")
    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config())
    base.save_pretrained(root / "base")
    tiny_tokenizer(root / "base")
    paths = {"_pretrained_": str(root / "base")}
    calib = {}
    for i, t in enumerate(("t0", "t1")):
        ft = LlamaForCausalLM(llama_config())
        ft.load_state_dict(base.state_dict())
        perturb_(ft, 0.05, seed=10 + i)
        ft.save_pretrained(root / t)
        paths[t] = str(root / t)
        recs = [{"input": s, "target": g} for s, g in zip(random_sentences(8, 20 + i), random_sentences(8, 30 + i, (1, 3)))]
        calib[t] = str(write_jsonl(root / f"{t}.jsonl", recs))
    return root, paths, calib


def pool(root, paths, tokenizer=True):
    return CausalLMPool(models=dict(paths), tokenizer=str(root / "base") if tokenizer else None,
                        model_kwargs={"dtype": "float32"})


def test_files_give_pave_rethinks_weights(family, tmp_path):
    from transformers import LlamaForCausalLM

    root, paths, calib = family
    algo = SpectralRethinking(inner={"name": "task_arithmetic", "scaling_factor": 0.5}, calibration=calib,
                              iterations=1, epochs=2, lr=1e-2, n_samples=8, batch_size=4,
                              exclude_keys=["lm_head"])  # pave rethink leaves the output embedding too
    got = algo.run(pool(root, paths)).state_dict()
    ta = TaskArithmeticAlgorithm(scaling_factor=0.5).run(pool(root, paths))  # the inner merge alone
    ta.save_pretrained(tmp_path / "ta")
    assert main(["rethink", "--base", paths["_pretrained_"], "--merged", str(tmp_path / "ta"), "--tokenizer",
                 paths["_pretrained_"], "--calib", *[f"{t}={p}" for t, p in calib.items()], "--iterations", "1",
                 "--epochs", "2", "--lr", "1e-2", "--samples", "8", "--batch-size", "4", "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "ref")]) == 0
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "ref").state_dict()
    assert algo.last_result.changed
    changed = 0
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-6, msg=k)
        changed += not torch.equal(v, ta.state_dict()[k])
    assert changed > 0


@pytest.mark.parametrize("case, needle", [
    ("bad record", "method.calibration: calibration file"),
    ("missing file", "method.calibration: no file"),
    ("no tokenizer", "method.calibration needs the pool's tokenizer"),
    ("no val datasets", "the model pool has no val datasets"),
])
def test_checked_before_the_merge(family, tmp_path, monkeypatch, case, needle):
    root, paths, calib = family
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"input": "a b"}])  # no target: loss ce needs one
    calibration = {"bad record": {"t0": str(bad)}, "missing file": {"t0": str(tmp_path / "none.jsonl")},
                   "no tokenizer": calib, "no val datasets": None}[case]
    algo = SpectralRethinking(calibration=calibration, iterations=1, epochs=1)

    def no_merge(*_a, **_k):
        raise AssertionError("the inner method ran before the calibration data was checked")

    monkeypatch.setattr(SpectralRethinking, "_run_inner", no_merge)
    with pytest.raises(RethinkConfigError, match=needle) as exc:
        algo.run(pool(root, paths, tokenizer=case != "no tokenizer"))
    assert "\n" not in str(exc.value)
    if case == "bad record":
        assert "method.loss=entropy" in str(exc.value) and str(bad) in str(exc.value)

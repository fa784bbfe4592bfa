"""FusionBench adapters (Python API): TSV-M vs FusionBench's TSVM, PAVE around FusionBench's own
methods vs independent computations (core called directly + FusionBench methods on a purified pool
built here), EMR end to end, progressive search, in-run collection plumbing, errors, discovery."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fusion_bench import BaseModelPool
from fusion_bench.method import TaskArithmeticAlgorithm, TaskSingularVectorMerging, TiesMergingAlgorithm
from fusion_bench.method.dare import DareTaskArithmetic
from fusion_bench.method.emr_merging import EMRMerging

from fusion_bench_helpers import (
    OutputMatchTaskPool,
    covariances_of,
    inputs_for,
    pool_dict,
    save_covariance_file,
    tiny_models,
)
from pave_plugins.fusion_bench import PAVEAlgorithm, TSVMerging
from fusion_bench_helpers import hand_purified_pool

TA = {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("covs")
    base, fts = tiny_models(3)
    covs = {n: covariances_of(m, inputs_for(n)) for n, m in fts.items()}
    files = {n: save_covariance_file(d / f"{n}.safetensors", c) for n, c in covs.items()}
    return base, fts, covs, files




# ---------------------------------------------------------------- TSV-M


@pytest.mark.parametrize("alpha", [1.0, 0.6, [0.5, 1.0, 1.5]])
def test_tsvm_same_weights_as_fusionbench(setup, alpha):
    base, fts, _, _ = setup
    ref = TaskSingularVectorMerging(alpha=alpha, exclude_keys=["table"]).run(BaseModelPool(pool_dict(base, fts)))
    ours = TSVMerging(alpha=alpha, exclude_keys=["table"]).run(BaseModelPool(pool_dict(base, fts)))
    b = base.state_dict()
    for k, v in ref.state_dict().items():
        delta = v - b[k]
        if delta.abs().max() > 0:
            assert rel(ours.state_dict()[k] - b[k], delta) <= 1e-5, k


def test_tsvm_sequential_loading_pool_matches_fusionbench(setup, tmp_path):
    """A pool that instantiates models on load takes the one-model-at-a-time (top-k triplets) path."""
    base, fts, _, _ = setup
    models = {}
    for n, m in {"_pretrained_": base, **fts}.items():
        torch.save(m.state_dict(), tmp_path / f"{n}.pt")
        models[n] = {"_target_": "fusion_bench_helpers.load_tiny", "path": str(tmp_path / f"{n}.pt")}
    ref = TaskSingularVectorMerging(alpha=1.0).run(BaseModelPool(pool_dict(base, fts)))
    algo = TSVMerging(alpha=1.0)
    ours = algo.run(BaseModelPool(models))
    b = base.state_dict()
    for k, v in ref.state_dict().items():
        delta = v - b[k]
        assert rel(ours.state_dict()[k] - b[k], delta) <= 1e-5, k


# ---------------------------------------------------------------- PAVE: full rank = inner method


def _inner_cases():
    return [
        ("task_arithmetic", lambda: TaskArithmeticAlgorithm(scaling_factor=0.3)),
        ("ties_merging", lambda: TiesMergingAlgorithm(scaling_factor=0.3, threshold=20, remove_keys=[], merge_func="sum")),
        (
            {"_target_": "fusion_bench.method.DareTaskArithmetic", "scaling_factor": 0.3, "sparsity_ratio": 0.5,
             "only_on_linear_weights": False, "rescale": True},
            lambda: DareTaskArithmetic(scaling_factor=0.3, sparsity_ratio=0.5, only_on_linear_weights=False),
        ),
        ("pave/tsv_m", lambda: TSVMerging(alpha=1.0)),
    ]


@pytest.mark.parametrize("case", range(4))
def test_full_rank_reproduces_inner_exactly(setup, case):
    base, fts, _, files = setup
    inner, make_ref = _inner_cases()[case]
    torch.manual_seed(123)
    ref = make_ref().run(BaseModelPool(pool_dict(base, fts)))
    torch.manual_seed(123)
    out = PAVEAlgorithm(inner=inner, rho=1.0, covariances=files).run(BaseModelPool(pool_dict(base, fts)))
    for k, v in ref.state_dict().items():
        assert torch.equal(out.state_dict()[k], v), k


# ---------------------------------------------------------------- PAVE vs independent computation


@pytest.mark.parametrize(
    "rho,target,method,inner",
    [(0.75, "weight", "spectral", "ta"), (0.8, "delta", "uniform", "ta"), (0.75, "weight", "spectral", "ties")],
)
def test_pave_matches_hand_purified_pool(setup, rho, target, method, inner):
    base, fts, covs, files = setup
    pool = hand_purified_pool(base, fts, covs, rho, target, method)
    if inner == "ta":
        ref = TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool)
        cfg = TA
    else:
        ref = TiesMergingAlgorithm(scaling_factor=0.3, threshold=20, remove_keys=[], merge_func="sum").run(pool)
        cfg = {"name": "ties_merging", "scaling_factor": 0.3}
    algo = PAVEAlgorithm(inner=cfg, rho=rho, target=target, rank_allocation=method, covariances=files)
    user_pool = pool_dict(base, fts)
    before = {n: copy.deepcopy(m.state_dict()) for n, m in user_pool.items() if n != "_pretrained_"}
    out = algo.run(BaseModelPool(user_pool))
    for k, v in ref.state_dict().items():
        assert rel(out.state_dict()[k], v) <= 1e-6, k
    # the purification changed something, and the user's fine-tuned models were not touched
    assert rel(out.state_dict()["fc1.weight"], TaskArithmeticAlgorithm(scaling_factor=0.3).run(
        BaseModelPool(pool_dict(base, fts))).state_dict()["fc1.weight"]) > 1e-4
    for n, sd in before.items():
        for k, v in sd.items():
            assert torch.equal(user_pool[n].state_dict()[k], v)
    rep = algo.last_report
    assert rep["format"] == "pave-rank-report" and rep["complete"]  # the engine's report, as pave purify's
    fc1 = rep["tensors"]["fc1.weight"]
    full = fc1["full_rank"]
    assert full == 12
    ranks = [fc1["models"][n]["rank"] for n in fts]
    assert sum(ranks) <= rho * 3 * full + 1e-9 or not fc1["budget_met"]
    assert rep["models"] == list(fts) and all(0 < v <= 1 for v in rep["model_ratios"].values())
    assert all(not rep["tensors"][n]["purified"] for n in rep["plain_task_vector"])
    assert not [n for n in rep["plain_task_vector"] if n.endswith(".weight") and n.startswith("fc")]


def test_pave_emr_end_to_end(setup, tmp_path):
    """PAVE+EMR returns EMR's modulated model; each task's model equals stock EMR on the purified pool."""
    base, fts, covs, files = setup
    ref = EMRMerging().run(hand_purified_pool(base, fts, covs, 0.75))
    algo = PAVEAlgorithm(inner="emr_merging/emr_merging", rho=0.75, covariances=files)
    out = algo.run(BaseModelPool(pool_dict(base, fts)))
    assert type(out).__name__ == "EMRModulatedModel"
    for n in fts:
        ref.set_task(n)
        out.set_task(n)
        for k, v in ref.backbone.state_dict().items():
            assert rel(out.backbone.state_dict()[k], v) <= 1e-6, (n, k)
    paths = PAVEAlgorithm.save_modulated(out, str(tmp_path / "per_task"), list(fts), BaseModelPool({}))
    assert [p.rsplit("/", 1)[-1] for p in paths] == list(fts)
    out.set_task("task1")
    saved = torch.load(paths[1], weights_only=True)
    # (switching tasks adds/subtracts modulators in place: equal up to float32 round-off)
    assert all(torch.allclose(saved[k], v, rtol=1e-6, atol=1e-7) for k, v in out.backbone.state_dict().items())


# ---------------------------------------------------------------- progressive search


def test_progressive_search(setup, tmp_path):
    base, fts, covs, files = setup
    tp = OutputMatchTaskPool(fts)
    algo = PAVEAlgorithm(inner=TA, rho=0.5, covariances=files, progressive_search=True, taskpool=tp,
                         report_path=str(tmp_path / "r.json"))
    best = algo.run(BaseModelPool(pool_dict(base, fts)))
    search = algo.last_report["progressive_search"]
    cands = search["candidates"]
    assert len(cands) == 3
    # candidate 0 = plain PAVE+TA; candidate c gives full rank to the c tasks with the largest gaps
    plain = PAVEAlgorithm(inner=TA, rho=0.5, covariances=files).run(BaseModelPool(pool_dict(base, fts)))
    ind = {n: tp.evaluate(fts[n])[n]["accuracy"] for n in fts}
    assert search["individual"] == pytest.approx(ind)
    s0 = tp.evaluate(plain)
    assert cands[0]["scores"] == pytest.approx({n: s0[n]["accuracy"] for n in fts})
    gaps = {n: ind[n] - s0[n]["accuracy"] for n in fts}
    assert cands[1]["full_rank_tasks"] == [max(gaps, key=gaps.get)]
    # candidate 1 independently: that task unpurified, the others purified as in candidate 0
    pool = hand_purified_pool(base, fts, covs, 0.5)
    first = cands[1]["full_rank_tasks"][0]
    pool._models[first] = copy.deepcopy(fts[first])
    s1 = tp.evaluate(TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool))
    assert cands[1]["scores"] == pytest.approx({n: s1[n]["accuracy"] for n in fts}, rel=1e-5)
    sel = search["selected"]
    assert cands[sel]["average"] == max(c["average"] for c in cands)
    sb = tp.evaluate(best)
    assert sum(v["accuracy"] for v in sb.values()) / 3 == pytest.approx(cands[sel]["average"], rel=1e-6)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert len(saved["progressive_search"]["candidates"]) == 3


# ---------------------------------------------------------------- in-run collection (plumbing)


def test_in_run_covariances_from_pool_task_data(setup, monkeypatch):
    """covariances: null -> each fine-tuned model is fed n_samples of its own task's train data
    through pave_plugins.collect.collect_covariances; compared with X^T X from plain hooks."""
    import pave_plugins.collect as collect_mod

    import fusion_bench_helpers as h

    base, fts, _, _ = setup
    fed = {}
    real = collect_mod.collect_covariances

    def spy(model, batches):
        batches = list(batches)
        fed[id(model)] = sum(b[0].shape[0] for b in batches)
        return real(model, batches)

    monkeypatch.setattr(collect_mod, "collect_covariances", spy)
    n = 24
    train = {k: {"_target_": "fusion_bench_helpers.task_dataset", "name": k} for k in fts}
    pool = BaseModelPool(pool_dict(base, fts), train_datasets=train)
    algo = PAVEAlgorithm(inner=TA, rho=0.75, covariances=None, n_samples=n, batch_size=5)
    out = algo.run(pool)
    assert sorted(fed.values()) == [n] * 3
    covs = {k: covariances_of(m, h.task_dataset(k).tensors[0][:n]) for k, m in fts.items()}
    ref = TaskArithmeticAlgorithm(scaling_factor=0.3).run(hand_purified_pool(base, fts, covs, 0.75))
    for k, v in ref.state_dict().items():
        assert rel(out.state_dict()[k], v) <= 1e-6, k


# ---------------------------------------------------------------- errors


def test_clear_errors(setup, tmp_path):
    base, fts, _, files = setup
    with pytest.raises(ValueError, match="unknown inner method 'no_such_method'"):
        PAVEAlgorithm(inner="no_such_method", covariances=files)
    with pytest.raises(ValueError, match="unknown inner method: cannot import"):
        PAVEAlgorithm(inner={"_target_": "fusion_bench.method.NoSuchThing"}, covariances=files).run(
            BaseModelPool(pool_dict(base, fts)))
    for rho in (1.5, 0.0, -0.1):
        with pytest.raises(ValueError, match="rho"):
            PAVEAlgorithm(inner="task_arithmetic", rho=rho, covariances=files)
    with pytest.raises(ValueError, match="gamma"):
        PAVEAlgorithm(inner="task_arithmetic", rho=0.9, gamma=0.95)
    with pytest.raises(ValueError, match="rank_allocation"):
        PAVEAlgorithm(inner="task_arithmetic", rank_allocation="greedy")
    partial = {k: v for k, v in files.items() if k != "task2"}
    with pytest.raises(ValueError, match=r"missing covariance for model\(s\) \['task2'\]"):
        PAVEAlgorithm(inner="task_arithmetic", covariances=partial).run(BaseModelPool(pool_dict(base, fts)))
    with pytest.raises(ValueError, match="missing covariance for model 'task0': file not found"):
        PAVEAlgorithm(inner="task_arithmetic", covariances={**files, "task0": str(tmp_path / "nope.safetensors")}).run(
            BaseModelPool(pool_dict(base, fts)))
    # a file lacking one layer that the other models have
    covs2 = covariances_of(fts["task1"], inputs_for("task1"))
    del covs2["fc2"]
    f2 = save_covariance_file(tmp_path / "t1.safetensors", covs2)
    with pytest.raises(ValueError, match=r"fc2.weight: missing covariance for model\(s\) \['task1 \("):
        PAVEAlgorithm(inner="task_arithmetic", covariances={**files, "task1": f2}).run(BaseModelPool(pool_dict(base, fts)))
    with pytest.raises(ValueError, match="no train dataset named 'task0'"):
        PAVEAlgorithm(inner="task_arithmetic", covariances=None).run(BaseModelPool(pool_dict(base, fts)))
    with pytest.raises(ValueError, match="progressive_search needs a task pool"):
        PAVEAlgorithm(inner="task_arithmetic", rho=0.75, covariances=files, progressive_search=True).run(
            BaseModelPool(pool_dict(base, fts)))
    with pytest.raises(ValueError, match="alpha has 2 values"):
        TSVMerging(alpha=[1.0, 2.0]).run(BaseModelPool(pool_dict(base, fts)))


# ---------------------------------------------------------------- discovery through Hydra


def test_hydra_configs_found_and_instantiated(setup):
    import fusion_bench
    from omegaconf import OmegaConf

    base, fts, _, files = setup
    cfg = fusion_bench.initialize_hydra_config(
        "fabric_model_fusion", overrides=["method=pave/pave_ties", "~taskpool", "method.rho=0.75"]
    )
    assert cfg.method._target_ == "pave_plugins.fusion_bench.PAVEAlgorithm" and cfg.method.inner == "ties_merging"
    method_cfg = OmegaConf.merge(cfg.method, {"covariances": files})
    algo = fusion_bench.instantiate(method_cfg)
    assert isinstance(algo, PAVEAlgorithm) and algo.rho == 0.75
    assert algo._inner_cfg._target_ == "fusion_bench.method.TiesMergingAlgorithm"
    assert OmegaConf.to_container(algo.config)["rho"] == 0.75  # config round-trips
    for name in ("pave/pave", "pave/pave_ta", "pave/pave_emr", "pave/pave_dare_ta", "pave/pave_dare_ties",
                 "pave/pave_tsv_m", "pave/tsv_m", "pave/tsv_c"):
        c = fusion_bench.initialize_hydra_config("fabric_model_fusion", overrides=[f"method={name}", "~taskpool"])
        fusion_bench.instantiate(OmegaConf.merge(c.method, {"covariances": files} if "pave/pave" in name else {}))
    tsv = fusion_bench.instantiate(
        fusion_bench.initialize_hydra_config("fabric_model_fusion", overrides=["method=pave/tsv_c", "~taskpool"]).method)
    out = tsv.run(BaseModelPool(pool_dict(base, fts)))
    assert set(out) == set(fts)
    # TSV-C keeps rank floor(R / T) = 4 of fc1's task vector
    d = out["task0"].fc1.weight - base.fc1.weight
    assert int(torch.linalg.matrix_rank(d.double(), rtol=1e-6)) == 4


def test_configs_have_one_copy():
    """configs/fusion_bench/ is the shipped folder itself (a link), not a copy kept in sync."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    shipped = root / "pave_plugins" / "configs"
    assert (root / "configs" / "fusion_bench").resolve() == shipped.resolve()
    for name in ("pave", "pave_ta", "pave_ties", "pave_emr", "pave_dare_ta", "pave_dare_ties", "pave_tsv_m", "tsv_m", "tsv_c"):
        assert (shipped / "method" / "pave" / f"{name}.yaml").is_file()

"""FusionBench ``pave/regmean`` and ``pave/pave_regmean`` (Python API and Hydra configs), against
FusionBench's own ``merging_with_regmean_weights`` (run in float64 on the same Gram matrices) and
against RegMean on a purified pool built independently."""

from __future__ import annotations

import copy

import pytest
import torch
from fusion_bench import BaseModelPool
from fusion_bench.method.regmean.regmean import merging_with_regmean_weights

from fusion_bench_helpers import covariances_of, inputs_for, pool_dict, tiny_models
from pave_plugins.fusion_bench import PAVEAlgorithm, RegMeanAlgorithm, RegMeanConfigError
from pave_plugins.io.covariance import CovarianceMetadata, save_covariances
from fusion_bench_helpers import hand_purified_pool

N_TOKENS = {"task0": 64, "task1": 40, "task2": 90}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny models, their Grams (different token counts per task) and covariance files with counts."""
    d = tmp_path_factory.mktemp("rmcovs")
    base, fts = tiny_models(3)
    covs = {n: covariances_of(m, inputs_for(n, N_TOKENS[n])) for n, m in fts.items()}
    files = {}
    for n, c in covs.items():
        keys = {layer: f"cov.{i}" for i, layer in enumerate(sorted(c))}
        meta = CovarianceMetadata(layer_map=keys, counts={k: N_TOKENS[n] for k in keys.values()})
        files[n] = str(save_covariances(d / f"{n}.safetensors", {keys[k]: v for k, v in c.items()}, meta))
    return base, fts, covs, files


def fusionbench_regmean(base, fts, grams, a):
    """FusionBench's merge of all parameters (float64 weights and Grams), loaded into the base."""
    params = {k: [m.state_dict()[k].double() for m in fts.values()] for k in base.state_dict()}
    merged = merging_with_regmean_weights(params, [grams[n] for n in fts], reduce_non_diagonal_ratio=a)
    return merged


@pytest.mark.parametrize("a, weighting", [(1.0, "sum"), (0.9, "mean")])
def test_regmean_matches_fusionbench(setup, a, weighting):
    base, fts, covs, files = setup
    algo = RegMeanAlgorithm(covariances=files, reduce_non_diagonal_ratio=a, gram_weighting=weighting)
    merged = algo.run(BaseModelPool(pool_dict(base, fts)))
    per_token = weighting == "mean"
    grams = {n: {k: (g / N_TOKENS[n] if per_token else g) for k, g in c.items()} for n, c in covs.items()}
    ref = fusionbench_regmean(base, fts, grams, a)
    for k, v in merged.state_dict().items():
        assert rel(v, ref[k]) < 1e-6, k  # float32 model weights; 1e-6 tolerance checks the maths
    rep = algo.last_report
    assert rep["n_regmean"] == 2 and rep["damped"] == [] and sorted(rep["not_regmean"]) == sorted(
        ["table", "fc1.bias", "norm.weight", "norm.bias", "fc2.bias"])  # the report lists tensors by name
    if a == 1.0:  # and ``sum`` (the paper) is a different merge than FusionBench's per-token mean
        other = fusionbench_regmean(base, fts, {n: {k: g / N_TOKENS[n] for k, g in c.items()} for n, c in covs.items()}, a)
        assert rel(merged.fc1.weight, other["fc1.weight"]) > 1e-3


def test_configs_resolve_and_instantiate(setup):
    import fusion_bench
    from omegaconf import OmegaConf

    base, fts, _, files = setup
    cfg = fusion_bench.initialize_hydra_config("fabric_model_fusion", overrides=["method=pave/regmean", "~taskpool"])
    algo = fusion_bench.instantiate(OmegaConf.merge(cfg.method, {"covariances": files, "reduce_non_diagonal_ratio": 0.5}))
    assert isinstance(algo, RegMeanAlgorithm) and OmegaConf.to_container(algo.config)["reduce_non_diagonal_ratio"] == 0.5
    cfg = fusion_bench.initialize_hydra_config("fabric_model_fusion", overrides=["method=pave/pave_regmean", "~taskpool"])
    pave = fusion_bench.instantiate(OmegaConf.merge(cfg.method, {"covariances": files}))
    assert isinstance(pave, PAVEAlgorithm) and pave._inner_cfg._target_ == "pave_plugins.fusion_bench.RegMeanAlgorithm"


def test_pave_inner_regmean_equals_regmean_on_purified_pool(setup):
    """pave/pave with inner pave/regmean (no covariances of its own: PAVE's) = RegMean on a pool purified
    independently with the same covariances."""
    base, fts, covs, files = setup
    inner = {"name": "pave/regmean", "reduce_non_diagonal_ratio": 0.8}
    merged = PAVEAlgorithm(inner=inner, rho=0.75, covariances=files).run(BaseModelPool(pool_dict(base, fts)))
    purified = hand_purified_pool(base, fts, covs, 0.75)
    ref = RegMeanAlgorithm(covariances=files, reduce_non_diagonal_ratio=0.8).run(purified)
    for (k, v), (k2, r) in zip(merged.state_dict().items(), ref.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(v, r, rtol=1e-5, atol=1e-6, msg=k)
    assert rel(merged.fc1.weight, RegMeanAlgorithm(covariances=files).run(BaseModelPool(pool_dict(base, fts))).fc1.weight) > 1e-4


def test_bad_input(setup, tmp_path):
    base, fts, _, files = setup
    pool = BaseModelPool(pool_dict(base, fts))
    with pytest.raises(RegMeanConfigError, match="RegMean: method.covariances is null"):
        RegMeanAlgorithm().run(pool)
    with pytest.raises(RegMeanConfigError, match=r"RegMean: missing covariance for model\(s\) \['task2'\]"):
        RegMeanAlgorithm(covariances={k: v for k, v in files.items() if k != "task2"}).run(pool)
    with pytest.raises(RegMeanConfigError, match="reduce_non_diagonal_ratio must be a number in"):
        RegMeanAlgorithm(covariances=files, reduce_non_diagonal_ratio=-0.1)
    with pytest.raises(RegMeanConfigError, match="gram_weighting must be one of"):
        RegMeanAlgorithm(covariances=files, gram_weighting="max")
    nocount = copy.deepcopy(files)
    nocount["task0"] = str(tmp_path / "c.safetensors")
    save_covariances(nocount["task0"], {"cov.0": torch.eye(12, dtype=torch.float64), "cov.1": torch.eye(16, dtype=torch.float64)},
                     CovarianceMetadata(layer_map={"fc1": "cov.0", "fc2": "cov.1"}))
    with pytest.raises(ValueError, match="gram_weighting 'mean' needs its token count"):
        RegMeanAlgorithm(covariances=nocount, gram_weighting="mean").run(pool)

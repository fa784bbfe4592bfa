"""``damping``, ``damping_rule``, ``rank_granularity`` and ``full_rank_models`` in every face (a
mergekit recipe, ``pave purify`` flags, a FusionBench ``pave/pave`` config) against PAVE as its
authors ran it, written out in float64 with explicit inverses
(:func:`independent_reference.authors_pave`)."""

from __future__ import annotations

import torch

from independent_reference import authors_pave
from mergekit_helpers import build_family, load_tensors, run_inprocess, write_covariances
from pave_plugins.io.covariance import CovarianceFile

RHO = 0.75


def llama_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("authors")
    base, fts = build_family("llama", root, n_models=3)
    covs = [write_covariances(d, root / f"cov{i}.safetensors", seed=20 + i) for i, d in enumerate(fts)]
    return root, base, fts, covs


def reference_layers(base_dir, ft_dirs, cov_paths):
    """``authors_pave``'s input for every tensor the covariance files cover, and the plain tensors."""
    base = load_tensors(base_dir)
    fts = [load_tensors(d) for d in ft_dirs]
    cfs = [CovarianceFile(c) for c in cov_paths]
    layers = {n: (b, [ft[n] for ft in fts], [cf.get(n) for cf in cfs], [cf.metadata.n_tokens for cf in cfs])
              for n, b in base.items() if n in cfs[0]}
    return base, fts, layers


def test_mergekit_recipe_with_damping_model_granularity_and_a_full_rank_model(tmp_path_factory):
    root, base_dir, ft_dirs, covs = llama_family(tmp_path_factory)
    weights = (1.0, 0.7, 0.5)
    models = "\n".join(
        f"  - model: {ft}\n    parameters: {{weight: {w}, covariance: {c}{', full_rank: true' if i == 1 else ''}}}"
        for i, (ft, w, c) in enumerate(zip(ft_dirs, weights, covs)))
    recipe = (f"merge_method: pave\nbase_model: {base_dir}\nmodels:\n{models}\nparameters:\n  inner: task_arithmetic\n"
              f"  lambda: 0.8\n  rho: {RHO}\n  damping: 0.1\n  rank_granularity: model\ndtype: float32\n")
    merged = load_tensors(run_inprocess(recipe, root / "merged"))
    base, fts, layers = reference_layers(base_dir, ft_dirs, covs)
    purified, _ = authors_pave(layers, RHO, damping=0.1, granularity="model", kept=(1,))
    for name, b in base.items():
        tvs = [w - b.double() for w in purified[name]] if name in layers else [ft[name].double() - b.double() for ft in fts]
        ref = b.double() + 0.8 * sum(w * t for w, t in zip(weights, tvs))
        torch.testing.assert_close(merged[name].double(), ref, rtol=1e-5, atol=2e-6, msg=name)
    # the kept model's task vector entered unchanged: the merge differs from purifying all three
    everyone, _ = authors_pave(layers, RHO, damping=0.1, granularity="model")
    some = next(iter(layers))
    assert not torch.allclose(everyone[some][1], purified[some][1])


def test_pave_purify_flags_authors_damping_model_granularity_full_rank_model(tmp_path_factory):
    from pave_plugins.cli import main

    root, base_dir, ft_dirs, covs = llama_family(tmp_path_factory)
    argv = ["purify", "--base", str(base_dir)]
    for m, c in zip(ft_dirs, covs):
        argv += ["--model", str(m), "--covariance", str(c)]
    out = root / "purified"
    assert main(argv + ["--rho", str(RHO), "--damping", "0.05", "--damping-rule", "authors", "--rank-granularity",
                        "model", "--full-rank-models", ft_dirs[2].name, "--out", str(out)]) == 0
    _, fts, layers = reference_layers(base_dir, ft_dirs, covs)
    purified, _ = authors_pave(layers, RHO, damping=0.05, rule="authors", granularity="model", kept=(2,))
    for i, ft_dir in enumerate(ft_dirs):
        got = load_tensors(out / ft_dir.name)
        for name in layers:
            torch.testing.assert_close(got[name].double(), purified[name][i], rtol=1e-5, atol=2e-6, msg=name)
        assert all(torch.equal(got[n], fts[i][n]) for n in layers) == (i == 2)


def test_fusion_bench_config_with_damping_model_granularity_and_a_full_rank_model(tmp_path):
    import copy

    from fusion_bench import BaseModelPool
    from fusion_bench.method import TaskArithmeticAlgorithm

    from fusion_bench_helpers import covariances_of, inputs_for, pool_dict, save_covariance_file, tiny_models
    from pave_plugins.fusion_bench import PAVEAlgorithm

    base, fts = tiny_models(3)
    covs = {n: covariances_of(m, inputs_for(n)) for n, m in fts.items()}
    files = {n: save_covariance_file(tmp_path / f"{n}.safetensors", c) for n, c in covs.items()}
    names = list(fts)
    layers = {f"{lay}.weight": (getattr(base, lay).weight.detach(), [getattr(fts[n], lay).weight.detach() for n in names],
                                [covs[n][lay] for n in names], [None] * 3) for lay in ("fc1", "fc2")}
    purified, _ = authors_pave(layers, RHO, damping=0.01, granularity="model", kept=(1,))
    hand = {n: copy.deepcopy(m) for n, m in fts.items()}
    for name, weights in purified.items():
        for n, w in zip(names, weights):
            getattr(hand[n], name.split(".")[0]).weight.data.copy_(w.float())
    ref = TaskArithmeticAlgorithm(scaling_factor=0.3).run(BaseModelPool(pool_dict(base, hand)))
    algo = PAVEAlgorithm(inner={"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3},
                         rho=RHO, damping=0.01, rank_granularity="model", full_rank_models=["task1"], covariances=files)
    out = algo.run(BaseModelPool(pool_dict(base, fts)))
    for k, v in ref.state_dict().items():
        rel = float((out.state_dict()[k].double() - v.double()).norm() / v.double().norm().clamp_min(1e-30))
        assert rel <= 1e-6, k

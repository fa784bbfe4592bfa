"""The engine's PAVE step and whole-model run (``pave_plugins.engine.step``) against references
written from the paper and from the authors' code, in float64 with explicit inverses:

* damping (``relative``: ``C + delta mean(diag C) I``; ``authors``: ``C / N + eps I`` with eps doubled
  until their inverse test passes) inside eq. 5, and full rank returning dW exactly with any damping;
* ``rank_granularity: model``: Algorithm 1 per layer, then each model's ratio (line 15) cutting
  all its layers at ``max(1, round(rho_i R))``, as the authors' code does;
* ``full_rank_models``: those models' task vectors unchanged, Algorithm 1 among the others;
* the missing-covariance rule and the report's records.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from independent_reference import authors_pave
from pave_plugins.engine import PaveSettings
from pave_plugins.engine.step import PaveEngine
from pave_plugins.io.covariance import CovarianceFile, CovarianceMetadata, save_covariances

pytestmark = pytest.mark.usefixtures("one_thread")

#: layer -> (out, in): two shapes so that per-layer and per-model ranks differ
SHAPES = {"a": (6, 9), "b": (9, 5)}


def family(tmp: Path, k: int = 3, tokens: int = 7, seed: int = 0):
    """Base weights, K fine-tunes and one covariance file per model (``tokens`` rows of X: for
    ``tokens`` below a layer's inputs its covariance is singular)."""
    g = torch.Generator().manual_seed(seed)
    base = {f"{n}.weight": torch.randn(shape, generator=g, dtype=torch.float64) for n, shape in SHAPES.items()}
    fts, covs, files = [], [], []
    for i in range(k):
        fts.append({n: w + 0.1 * torch.randn(w.shape, generator=g, dtype=torch.float64) for n, w in base.items()})
        cov = {}
        for layer, (_, d_in) in SHAPES.items():
            x = torch.randn(tokens, d_in, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, d_in,
                                                                                              dtype=torch.float64)
            cov[layer] = x.T @ x
        covs.append(cov)
        meta = CovarianceMetadata(layer_map={n: n for n in SHAPES}, counts={n: tokens for n in SHAPES}, n_tokens=tokens)
        files.append(CovarianceFile(save_covariances(tmp / f"cov{i}.safetensors", cov, meta)))
    return base, fts, covs, files


def run(settings: PaveSettings, base, fts, files, labels=None):
    """The engine over the family: {tensor: [purified weight of each model]} and the report."""
    labels = labels or [f"m{i}" for i in range(len(fts))]
    out: dict[str, list[torch.Tensor]] = {}

    def write(name, step, w_base, w_fts):
        out[name] = [w_base + p.task_vector if p is not None else w for p, w in zip(step.purifications, w_fts)]

    engine = PaveEngine(settings, files, labels)
    report = engine.run(list(base), lambda n: (base[n], [ft[n] for ft in fts]), write)
    return out, report


def reference(base, fts, covs, rho, *, n_tokens=7, **authors):
    """:func:`independent_reference.authors_pave` on the family."""
    layers = {n: (base[n], [ft[n] for ft in fts], [c[n.split(".")[0]] for c in covs], [n_tokens] * len(fts))
              for n in base}
    return authors_pave(layers, rho, **authors)


def assert_matches(out, ref, atol=1e-8):
    for n in ref:
        for i, (got, want) in enumerate(zip(out[n], ref[n])):
            assert torch.allclose(got, want, atol=atol, rtol=1e-7), (n, i, float((got - want).abs().max()))


@pytest.mark.parametrize("damping, rule", [(0.0, "relative"), (1e-3, "relative"), (0.1, "relative"), (1.0, "relative"),
                                           (0.1, "authors"), (0.01, "authors")])
@pytest.mark.parametrize("granularity", ["layer", "model"])
def test_damping_and_granularity_match_the_explicit_inverse_reference(tmp_path, damping, rule, granularity):
    base, fts, covs, files = family(tmp_path, tokens=12)  # full-rank covariances: no extra damping needed
    s = PaveSettings(rho=0.75, damping=damping, damping_rule=rule, rank_granularity=granularity)
    out, report = run(s, base, fts, files)
    ref, ranks = reference(base, fts, covs, 0.75, damping=damping, rule=rule, n_tokens=12, granularity=granularity)
    assert_matches(out, ref)
    for n in base:
        assert [report.tensors[n]["models"][f"m{i}"]["rank"] for i in range(3)] == [ranks[n][i] for i in range(3)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damping=st.floats(1e-3, 3.0), rho=st.sampled_from([0.5, 0.75, 0.875]), seed=st.integers(0, 10**6),
       tokens=st.integers(10, 30), granularity=st.sampled_from(["layer", "model"]))
def test_generated_damped_runs_match_the_reference(tmp_path_factory, damping, rho, seed, tokens, granularity):
    tmp = tmp_path_factory.mktemp("gen")
    base, fts, covs, files = family(tmp, tokens=tokens, seed=seed)
    s = PaveSettings(rho=rho, damping=damping, rank_granularity=granularity)
    out, _ = run(s, base, fts, files)
    ref, _ = reference(base, fts, covs, rho, damping=damping, n_tokens=tokens, granularity=granularity)
    assert_matches(out, ref, atol=1e-7)


@pytest.mark.parametrize("damping, rule", [(0.0, "relative"), (0.5, "relative"), (10.0, "relative"), (0.1, "authors")])
def test_full_rank_returns_the_task_vector_exactly_with_any_damping(tmp_path, damping, rule):
    base, fts, _, files = family(tmp_path, tokens=4)  # singular covariances
    out, report = run(PaveSettings(rho=1.0, damping=damping, damping_rule=rule), base, fts, files)
    for n in base:
        for i, ft in enumerate(fts):
            assert torch.allclose(out[n][i] - base[n], ft[n] - base[n], atol=1e-12, rtol=0)
            assert report.tensors[n]["models"][f"m{i}"]["damping"] > 0  # reported per layer and model


def test_the_damping_used_is_reported_per_layer_and_model(tmp_path):
    base, fts, covs, files = family(tmp_path, tokens=12)
    _, report = run(PaveSettings(rho=0.75, damping=0.05), base, fts, files)
    for n in base:
        for i in range(3):
            rec = report.tensors[n]["models"][f"m{i}"]
            mean_diag = float(torch.diagonal(covs[i][n.split(".")[0]]).mean())
            assert math.isclose(rec["relative_damping"], 0.05, rel_tol=1e-12)
            assert math.isclose(rec["damping"], 0.05 * mean_diag, rel_tol=1e-12)
    assert report.settings["damping"] == 0.05 and report.settings["damping_rule"] == "relative"


def test_authors_damping_on_a_singular_covariance_doubles_as_their_code(tmp_path):
    base, fts, covs, files = family(tmp_path, tokens=3)  # rank 3 of 9 and 5 inputs: eps must grow
    out, report = run(PaveSettings(rho=0.75, damping=1e-4, damping_rule="authors"), base, fts, files)
    ref, _ = reference(base, fts, covs, 0.75, damping=1e-4, rule="authors", n_tokens=3)
    assert_matches(out, ref, atol=1e-7)
    eps = report.tensors["a.weight"]["models"]["m0"]["damping"] / 3
    assert eps > 1e-4 and math.log2(eps / 1e-4) == pytest.approx(round(math.log2(eps / 1e-4)))


@pytest.mark.parametrize("kept", [("m1",), ("m0", "m2")])
def test_full_rank_models_keep_their_task_vector_and_the_others_share_algorithm_1(tmp_path, kept):
    base, fts, covs, files = family(tmp_path, tokens=12)
    out, report = run(PaveSettings(rho=0.75, full_rank_models=kept), base, fts, files)
    idx = tuple(int(k[1]) for k in kept)
    ref, _ = reference(base, fts, covs, 0.75, kept=idx)
    assert_matches(out, ref)
    for n in base:
        for i in idx:
            assert torch.equal(out[n][i], fts[i][n])
            assert report.tensors[n]["models"][f"m{i}"] == {"purified": False,
                                                            "reason": "kept at full rank (full_rank_models)"}


def test_full_rank_models_match_folder_names_and_refuse_unknown_ones(tmp_path):
    base, fts, covs, files = family(tmp_path, tokens=12)
    labels = ["/data/ft/alpha", "/data/ft/beta", "/data/ft/gamma"]
    out, _ = run(PaveSettings(rho=0.75, full_rank_models=("beta",)), base, fts, files, labels=labels)
    assert torch.equal(out["a.weight"][1], fts[1]["a.weight"])
    with pytest.raises(ValueError, match="full_rank_models: 'betta' is none of the models"):
        run(PaveSettings(rho=0.75, full_rank_models=("betta",)), base, fts, files, labels=labels)


def test_a_full_rank_model_without_a_covariance_is_not_a_missing_covariance(tmp_path):
    base, fts, covs, files = family(tmp_path, tokens=12)
    out, _ = run(PaveSettings(rho=0.75, full_rank_models=("m2",)), base, fts, [files[0], files[1], None])
    ref, _ = reference(base, fts, covs, 0.75, kept=(2,))
    assert_matches(out, ref)
    with pytest.raises(ValueError, match="missing covariance for model"):
        run(PaveSettings(rho=0.75), base, fts, [files[0], files[1], None])


def test_settings_refuse_what_cannot_run():
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        PaveSettings(damping=-1.0)
    with pytest.raises(ValueError, match="damping_rule authors needs damping > 0"):
        PaveSettings(damping_rule="authors")
    with pytest.raises(ValueError, match="rank_granularity must be one of"):
        PaveSettings(rank_granularity="tensor")
    assert PaveSettings(full_rank_models=["a", "b"]).full_rank_models == ("a", "b")


def test_authors_rule_without_a_token_count_names_the_file(tmp_path):
    base, fts, covs, _ = family(tmp_path, tokens=12)
    meta = CovarianceMetadata(layer_map={n: n for n in SHAPES})  # no counts, n_tokens 0
    files = [CovarianceFile(save_covariances(tmp_path / f"bare{i}.safetensors", covs[i], meta)) for i in range(3)]
    with pytest.raises(ValueError, match=r"bare0\.safetensors.*needs the token count N"):
        run(PaveSettings(damping=0.1, damping_rule="authors"), base, fts, files)

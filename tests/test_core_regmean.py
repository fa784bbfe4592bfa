"""RegMean core (arXiv 2212.09849) against independent computations: a brute-force least-squares
solution of RegMean's objective with the inputs X_i written out, and FusionBench's own
``merging_with_regmean_weights`` on identical Gram matrices (both measured against a float64
reference)."""

from __future__ import annotations

import pytest
import torch
from fusion_bench.method.regmean.regmean import merging_with_regmean_weights

from pave_plugins.core.regmean import merge_non_linear, regmean_merge
from pave_plugins.engine.regmean import RegMeanSettings

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def layer(k=3, out=5, inn=7, tokens=(20, 25, 30), seed=0, spread=2.0):
    """K models' inputs X_i (rows = tokens, anisotropic) and weights W_i (out x in), float64."""
    g = torch.Generator().manual_seed(seed)
    xs = [
        torch.randn(n, inn, generator=g, dtype=F64) * torch.logspace(0, -spread, inn, dtype=F64)[torch.randperm(inn, generator=g)]
        for n in tokens[:k]
    ]
    ws = [torch.randn(out, inn, generator=g, dtype=F64) for _ in range(k)]
    return xs, ws


def brute_force(xs, ws, a=1.0, weighting="sum"):
    """argmin_W sum_i a ||X_i W^T - X_i W_i^T||^2 + (1 - a) ||D_i^{1/2} (W - W_i)^T||^2 (D_i = diag X_i^T X_i),
    each model's term divided by its token count for ``mean``: one stacked least-squares problem."""
    rows, rhs = [], []
    for x, w in zip(xs, ws):
        s = x.shape[0] ** -0.5 if weighting == "mean" else 1.0
        d = torch.diag(((s * x) ** 2).sum(0).sqrt() * (1 - a) ** 0.5)
        rows += [a**0.5 * s * x, d]
        rhs += [a**0.5 * s * x @ w.T, d @ w.T]
    return torch.linalg.lstsq(torch.cat(rows), torch.cat(rhs), driver="gelsd").solution.T


@pytest.mark.parametrize("a", [1.0, 0.6, 0.0])
@pytest.mark.parametrize("weighting", ["sum", "mean"])
@pytest.mark.parametrize("shape", [(5, 7), (9, 4)])
def test_matches_brute_force_least_squares(a, weighting, shape):
    xs, ws = layer(out=shape[0], inn=shape[1])
    sol = regmean_merge(ws, [x.T @ x for x in xs], ratio=a, token_counts=[x.shape[0] for x in xs],
                        gram_weighting=weighting)
    assert sol.damping == 0.0
    assert rel(sol.weight, brute_force(xs, ws, a, weighting)) < 1e-8


def test_each_gram_singular_but_their_sum_is_not():
    """Fewer tokens than inputs per model (each G_i singular): no damping, still the exact solution."""
    xs, ws = layer(k=3, out=6, inn=12, tokens=(5, 4, 6))
    sol = regmean_merge(ws, [x.T @ x for x in xs])
    assert sol.damping == 0.0
    assert rel(sol.weight, brute_force(xs, ws)) < 1e-8


def test_identical_models_and_one_model_give_that_model():
    xs, ws = layer()
    grams = [x.T @ x for x in xs]
    assert rel(regmean_merge([ws[0]] * 3, grams).weight, ws[0]) < 1e-12
    assert rel(regmean_merge(ws[:1], grams[:1]).weight, ws[0]) < 1e-12


def test_singular_gram_sum_is_damped_and_reported():
    """An input feature no model's data reaches: damped, reported, that column takes the mean weight."""
    xs, ws = layer(inn=6)
    for x in xs:
        x[:, 2] = 0.0
    sol = regmean_merge(ws, [x.T @ x for x in xs])
    assert sol.damping > 0.0 and 0.0 < sol.relative_damping < 1e-6
    mean = sum(ws) / len(ws)
    assert rel(sol.weight[:, 2], mean[:, 2]) < 1e-8
    keep = [0, 1, 3, 4, 5]  # the other columns: the regression on the live features
    ref = brute_force([x[:, keep] for x in xs], [w[:, keep] for w in ws])
    assert rel(sol.weight[:, keep], ref) < 1e-6
    assert rel(regmean_merge([ws[0]] * 3, [x.T @ x for x in xs]).weight, ws[0]) < 1e-12


def fusionbench(ws, grams, a, dtype):
    """FusionBench's own merge on the same Grams (already divided by token counts) in ``dtype``."""
    params = {"fc.weight": [w.to(dtype) for w in ws]}
    out = merging_with_regmean_weights(params, [{"fc": g.to(dtype)} for g in grams], reduce_non_diagonal_ratio=a)
    return out["fc.weight"]


@pytest.mark.parametrize("a", [1.0, 0.9])
def test_against_fusionbench_on_identical_grams(a):
    """FusionBench keeps per-token Grams (``mean`` weighting) and inverts their sum with torch.inverse in
    float32. On the same Gram matrices, both against a float64 solve of the same problem and against
    the brute force on the X_i: ours (float64 Cholesky) is at round-off, FusionBench at its float32
    inverse error; FusionBench run in float64 agrees with ours."""
    xs, ws = layer(k=4, out=48, inn=64, tokens=(200, 150, 300, 250), spread=3.0)
    ws = [w.float().double() for w in ws]
    grams32 = [(x.T @ x / x.shape[0]).float() for x in xs]  # what FusionBench's hooks hold
    ref = brute_force(xs, ws, a, "mean")
    ours = regmean_merge(ws, grams32, ratio=a, gram_weighting="sum").weight  # the Grams are already per token
    fb32 = fusionbench(ws, grams32, a, torch.float32)
    fb64 = fusionbench(ws, grams32, a, F64)
    err_ours, err_fb32 = rel(ours, ref), rel(fb32, ref)
    # the brute force uses the exact X_i; the float32 Grams are off by ~1e-7 relative, which moves
    # the solution by about cond * 1e-7: measure against a float64 solve of the float32 Grams too
    exact = torch.linalg.solve(sum(_reduce(g.double(), a) for g in grams32),
                               sum(_reduce(g.double(), a) @ w.T for g, w in zip(grams32, ws))).T
    assert rel(ours, exact) < 1e-10
    # FusionBench in float64: only its off-diagonal scale factors are still float32 (torch.ones defaults)
    assert rel(fb64, exact) < (1e-10 if a == 1.0 else 1e-6)
    assert rel(fb32, exact) > 10 * rel(ours, exact)
    assert rel(fb32, exact) < 1e-2
    assert err_ours <= err_fb32 * 1.01
    print(f"a={a}: vs float64 solve of the same Grams: ours {rel(ours, exact):.2e}, FusionBench float32 "
          f"{rel(fb32, exact):.2e}, FusionBench float64 {rel(fb64, exact):.2e}; vs brute force on X: ours "
          f"{err_ours:.2e}, FusionBench float32 {err_fb32:.2e}")


def _reduce(g, a):
    """G~ = a G + (1 - a) diag(G), written out for the reference."""
    return a * g + (1 - a) * torch.diag(torch.diagonal(g))


def test_mean_weighting_uses_token_counts():
    """``mean`` weighting on raw Grams with their counts equals ``sum`` on per-token Grams."""
    xs, ws = layer(tokens=(10, 40, 90))
    raw = [x.T @ x for x in xs]
    counts = [x.shape[0] for x in xs]
    a = regmean_merge(ws, raw, token_counts=counts, gram_weighting="mean").weight
    b = regmean_merge(ws, [g / n for g, n in zip(raw, counts)]).weight
    assert rel(a, b) < 1e-12
    assert rel(a, regmean_merge(ws, raw).weight) > 1e-3  # and it is a different merge than ``sum``


def test_non_linear_rules():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 3, generator=g)
    ws = [base + 0.1 * torch.randn(4, 3, generator=g) for _ in range(3)]
    torch.testing.assert_close(merge_non_linear(ws), (ws[0] + ws[1] + ws[2]) / 3)
    ta = merge_non_linear(ws, rule="task_arithmetic", base=base, scaling_factor=0.4)
    torch.testing.assert_close(ta, base + 0.4 * ((ws[0] - base) + (ws[1] - base) + (ws[2] - base)))
    ints = [torch.arange(5), torch.arange(5)]
    assert torch.equal(merge_non_linear(ints), torch.arange(5))


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda ws, gs: regmean_merge(ws, gs, ratio=1.5), "reduce_non_diagonal_ratio must be a number in"),
        (lambda ws, gs: regmean_merge(ws, gs, gram_weighting="mean"), "needs its token count"),
        (lambda ws, gs: regmean_merge(ws, gs, gram_weighting="median"), "gram_weighting must be one of"),
        (lambda ws, gs: regmean_merge([w.T for w in ws], gs), "inputs but the Gram matrices are"),
        (lambda ws, gs: regmean_merge(ws, [gs[0], -gs[1], gs[2]]), "negative diagonal"),
        (lambda ws, gs: regmean_merge([ws[0], ws[1] * float("nan"), ws[2]], gs), "model 1 contains NaN"),
        (lambda ws, gs: merge_non_linear(ws, rule="task_arithmetic"), "needs the base model"),
        (lambda ws, gs: RegMeanSettings(non_linear="median"), "non_linear must be one of"),
    ],
)
def test_bad_input_one_line_errors(call, pattern):
    xs, ws = layer()
    with pytest.raises(ValueError, match=pattern) as err:
        call(ws, [x.T @ x for x in xs])
    assert "\n" not in str(err.value)


def test_engine_in_out_layout_and_shared_inputs(tmp_path):
    """The engine on a covariance file: a GPT-2 Conv1D weight (stored in x out, marked in the file)
    merges as the transpose of the out x in merge; q/k/v sharing one input prepare one Gram sum."""
    from pave_plugins.engine.regmean import RegMeanEngine
    from pave_plugins.io.covariance import CovarianceFile, CovarianceMetadata, save_covariances

    xs, ws = layer(k=2, out=5, inn=7)
    files = []
    for i, x in enumerate(xs):
        meta = CovarianceMetadata(
            layer_map={"attn.c_attn": "cov.0", "q": "cov.0", "k": "cov.0"}, counts={"cov.0": x.shape[0]},
            extra={"layers": {"attn.c_attn": {"weight_layout": "in_out"}}},
        )
        files.append(CovarianceFile(save_covariances(tmp_path / f"{i}.safetensors", {"cov.0": x.T @ x}, meta)))
    engine = RegMeanEngine(RegMeanSettings(), files, ["a", "b"])
    ref = brute_force(xs, ws)
    conv, rec = engine.step("attn.c_attn.weight", [w.T.contiguous() for w in ws])
    assert rec["regmean"] and rec["damping"] == 0.0 and rel(conv, ref.T) < 1e-8
    for name in ("q.weight", "k.weight"):
        assert rel(engine.step(name, ws)[0], ref) < 1e-8
    assert engine.cache.n_prepared == 1
    bias, rec = engine.step("q.bias", [torch.ones(5), 3 * torch.ones(5)])
    assert torch.equal(bias, 2 * torch.ones(5)) and rec == {"regmean": False, "merged_by": "mean", "reason": "not a 2-D weight (1-D)"}


def test_engine_names_the_file_of_a_bad_gram(tmp_path):
    from pave_plugins.engine.regmean import RegMeanEngine
    from pave_plugins.io.covariance import CovarianceFile, CovarianceFileError, CovarianceMetadata, save_covariances

    xs, ws = layer(k=2)
    grams = [xs[0].T @ xs[0], xs[1].T @ xs[1]]
    grams[1][0, 0] = float("nan")
    files = [CovarianceFile(save_covariances(tmp_path / f"{i}.safetensors", {"cov.0": g},
                                             CovarianceMetadata(layer_map={"fc": "cov.0"})))
             for i, g in enumerate(grams)]
    with pytest.raises(CovarianceFileError, match=r"covariance 'cov.0' \(layer 'fc.weight'\) in .*1.safetensors: contains NaN"):
        RegMeanEngine(RegMeanSettings(), files, ["a", "b"]).step("fc.weight", ws)

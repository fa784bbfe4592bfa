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


# ---------------------------------------------------------------------------------------------
# Boundary cases found unguarded by mutation testing: defaults, compute and output dtypes, the
# kept Cholesky factor, token counts, and error messages that name the layer.


def test_defaults_are_the_closed_form_with_summed_grams():
    from pave_plugins.core.regmean import prepare_gram_sum, regmean_grams, regmean_solve

    xs, ws = layer()
    grams = [x.T @ x for x in xs]
    reduced = regmean_grams(grams)  # ratio 1, "sum" weighting, float64
    assert all(r.dtype == F64 and torch.equal(r, g) for r, g in zip(reduced, grams))
    prepared = prepare_gram_sum(reduced)
    # the kept lower Cholesky factor of sum_i G_i
    total = grams[0] + grams[1] + grams[2]
    assert prepared.factor is not None and rel(prepared.factor @ prepared.factor.T, total) < 1e-14
    assert torch.equal(prepared.factor, torch.tril(prepared.factor))
    assert rel(regmean_solve(ws, reduced, prepared).weight, brute_force(xs, ws)) < 1e-8
    # a prepared sum without a factor (prepare_covariance's default): factorised on the spot
    from pave_plugins.core.purify import PreparedCovariance

    bare = PreparedCovariance(matrix=total, damping=0.0, relative_damping=0.0)
    assert rel(regmean_solve(ws, reduced, bare).weight, brute_force(xs, ws)) < 1e-8


def test_float32_weights_and_float32_compute():
    xs, ws = layer(out=6, inn=8)
    grams = [x.T @ x for x in xs]
    ref = brute_force(xs, ws)
    w32 = [w.float() for w in ws]
    sol = regmean_merge(w32, grams)  # float64 solve, result in the weights' dtype
    assert sol.weight.dtype == torch.float32
    assert rel(sol.weight, brute_force(xs, [w.double() for w in w32])) < 1e-6
    sol32 = regmean_merge(ws, [g.float() for g in grams], compute_dtype=torch.float32)
    assert sol32.weight.dtype == F64 and sol32.damping == 0.0 and rel(sol32.weight, ref) < 1e-4
    # a Gram sum singular at float32 precision (one input feature 1e-5 times smaller than the others
    # in every model: 1e-10 of the variance) is damped when solved in float32 and not in float64
    xs, ws = layer(out=4, inn=6, spread=0.0)
    for x in xs:
        x[:, 2] *= 1e-5
    grams = [x.T @ x for x in xs]
    assert regmean_merge(ws, grams).damping == 0.0
    assert regmean_merge(ws, grams, compute_dtype=torch.float32).damping > 0.0


def test_token_counts_and_ratio_checks():
    from pave_plugins.core.regmean import check_non_diagonal_ratio, weighted_gram

    g = torch.eye(3, dtype=F64) * 6.0
    assert torch.equal(weighted_gram(g, 1, "mean"), g)  # one token: the Gram itself
    assert torch.equal(weighted_gram(g, 3, "mean"), g / 3)
    for bad in (0, -2, None):
        with pytest.raises(ValueError, match=rf"^Gram matrix: gram_weighting 'mean' needs its token count, got {bad!r}$"):
            weighted_gram(g, bad, "mean")
    assert check_non_diagonal_ratio(0) == 0.0 and check_non_diagonal_ratio(1) == 1.0
    for bad in (True, False, "0.5", 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"^reduce_non_diagonal_ratio must be a number in \[0, 1\], got "):
            check_non_diagonal_ratio(bad)


@pytest.mark.parametrize("name, prefix", [(None, "weight"), ("fc.weight", "fc.weight")])
def test_errors_name_the_layer(name, prefix):
    from pave_plugins.core.regmean import prepare_gram_sum, regmean_grams, regmean_solve

    xs, ws = layer()
    grams = [x.T @ x for x in xs]
    kw = {} if name is None else {"name": name}
    cases = [
        (lambda: regmean_merge(ws, grams, token_counts=[5, 6], **kw), f"{prefix}: 2 token counts for 3 Gram matrices"),
        (lambda: regmean_merge(ws, grams, gram_weighting="mean", token_counts=[5, None, 6], **kw),
         f"{prefix}, model 1: gram_weighting 'mean' needs its token count, got None"),
        (lambda: regmean_merge(ws, [grams[0], grams[1][:, :6], grams[2]], **kw),
         rf"{prefix}: Gram matrix of model 1 must be square, got shape \(7, 6\)"),
        (lambda: regmean_merge(ws, [grams[0], grams[1][:6], grams[2]], **kw),
         rf"{prefix}: Gram matrix of model 1 must be square, got shape \(6, 7\)"),
        (lambda: regmean_merge([ws[0], ws[1][:4], ws[2]], grams, **kw),
         rf"{prefix}: weight of model 1 has shape \(4, 7\), expected \(5, 7\)"),
        (lambda: regmean_merge(ws, [grams[0], -grams[1], grams[2]], **kw),
         f"RegMean Gram sum of {prefix}: has negative diagonal entries"),
        (lambda: regmean_merge([], [], **kw), f"{prefix}: RegMean needs at least one Gram matrix"),
        (lambda: prepare_gram_sum([], **kw), f"{prefix}: RegMean needs at least one Gram matrix"),
        (lambda: regmean_grams(grams, token_counts=[1], **kw), f"{prefix}: 1 token counts for 3 Gram matrices"),
    ]
    prepared = prepare_gram_sum(grams)
    cases += [
        (lambda: regmean_solve(ws, grams[:2], prepared, **kw), f"{prefix}: 3 weights for 2 Gram matrices"),
        (lambda: regmean_solve([], [], prepared, **kw), f"{prefix}: 0 weights for 0 Gram matrices"),
        (lambda: regmean_solve([ws[0], ws[1][:4], ws[2]], grams, prepared, **kw),
         rf"{prefix}: weight of model 1 has shape \(4, 7\), expected \(5, 7\)"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match="^" + pattern):
            call()


def test_non_linear_rules_edge_cases():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(3, 4, generator=g)
    ws = [base + torch.randn(3, 4, generator=g) for _ in range(2)]
    # task arithmetic's default scaling factor is 1: base + sum of task vectors
    torch.testing.assert_close(merge_non_linear(ws, rule="task_arithmetic", base=base),
                               base + (ws[0] - base) + (ws[1] - base))
    torch.testing.assert_close(merge_non_linear(ws[:1], rule="task_arithmetic", base=base, scaling_factor=0.5),
                               base + 0.5 * (ws[0] - base))
    assert torch.equal(merge_non_linear(ws[:1]), ws[0])
    # integer buffers are not merged: the first model's
    assert torch.equal(merge_non_linear([torch.arange(4), torch.arange(4) + 7]), torch.arange(4))
    # float16: averaged in float32 (3 x 40000 overflows float16), returned in float16
    big = [torch.full((2,), 40000.0, dtype=torch.float16), torch.full((2,), 30000.0, dtype=torch.float16)]
    out = merge_non_linear(big)
    assert out.dtype == torch.float16 and torch.equal(out, torch.full((2,), 35000.0, dtype=torch.float16))
    b16 = torch.full((2,), 30000.0, dtype=torch.float16)
    ta = merge_non_linear(big, rule="task_arithmetic", base=b16, scaling_factor=0.5)
    assert ta.dtype == torch.float16 and torch.equal(ta, torch.full((2,), 35000.0, dtype=torch.float16))
    assert merge_non_linear([big[0], big[1].float()]).dtype == torch.float16  # the first weight's dtype
    for call, pattern in [
        (lambda: merge_non_linear(ws, rule="median"), r"non_linear must be one of \('mean', 'task_arithmetic'\), got 'median'"),
        (lambda: merge_non_linear([]), "weight: nothing to merge"),
        (lambda: merge_non_linear([], name="ln.bias"), "ln.bias: nothing to merge"),
        (lambda: merge_non_linear(ws, scaling_factor=float("inf")), "scaling_factor must be a finite number, got inf"),
        (lambda: merge_non_linear(ws, rule="task_arithmetic"), "weight: non_linear 'task_arithmetic' needs the base model"),
    ]:
        with pytest.raises(ValueError, match="^" + pattern + "$"):
            call()

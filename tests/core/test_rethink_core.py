"""LoRA-DV spectral rethinking, core maths (pave_plugins.core.rethink) against independent
computations: dense SVD of dense matrices, hand reconstruction of weights, hand-written losses."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import TinyMLP
from torch import nn

from pave_plugins.core import rethink as rt


pytestmark = pytest.mark.usefixtures("one_thread")


def _low_rank_factors(out=24, inp=18, ranks=(2, 3, 4), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    bs = [torch.randn(out, r, generator=g, dtype=dtype) for r in ranks]
    as_ = [torch.randn(r, inp, generator=g, dtype=dtype) for r in ranks]
    weights = [0.5, -1.25, 2.0][: len(ranks)]
    return bs, as_, weights


def test_low_rank_fast_path_matches_dense_svd():
    bs, as_, w = _low_rank_factors()
    dense = sum(wi * b @ a for wi, b, a in zip(w, bs, as_))
    ref = torch.linalg.svdvals(dense)
    spec = rt.decompose_low_rank(rt.LowRankDelta(bs, as_, w), compute_dtype=torch.float64)
    assert spec.rank == 9  # sum of LoRA ranks, not min(out, in)
    torch.testing.assert_close(spec.s, ref[:9], rtol=1e-10, atol=1e-10)
    assert float(ref[9:].abs().max()) < 1e-10
    torch.testing.assert_close(spec.u @ torch.diag(spec.s) @ spec.v.T, dense, rtol=0, atol=1e-10)
    eye = torch.eye(9, dtype=torch.float64)
    torch.testing.assert_close(spec.u.T @ spec.u, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(spec.v.T @ spec.v, eye, rtol=0, atol=1e-10)
    # top-k: the best rank-k approximation (Eckart-Young) of the dense matrix
    top = rt.decompose_low_rank(rt.LowRankDelta(bs, as_, w), top_k=4, compute_dtype=torch.float64)
    u, s, vh = torch.linalg.svd(dense)
    torch.testing.assert_close(top.matrix(), (u[:, :4] * s[:4]) @ vh[:4], rtol=0, atol=1e-10)


def test_low_rank_fast_path_never_runs_a_dense_svd(monkeypatch):
    bs, as_, w = _low_rank_factors(out=300, inp=200, ranks=(4, 4))
    seen = []
    real_svd = torch.linalg.svd

    def spy(a, *args, **kwargs):
        seen.append(tuple(a.shape))
        return real_svd(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    rt.decompose_low_rank(rt.LowRankDelta(bs, as_, w))
    assert seen and all(max(s) <= 8 for s in seen), seen


def test_dense_decomposition_and_lambda_one_reconstructs_merge():
    g = torch.Generator().manual_seed(1)
    pre = torch.randn(16, 12, generator=g)
    merged = pre + 0.01 * torch.randn(16, 12, generator=g)
    spec = rt.decompose_dense(merged - pre)
    w = pre + spec.matrix(torch.ones(spec.rank))
    torch.testing.assert_close(w, merged, rtol=0, atol=1e-6)
    # top-k with keep_tail: anchor holds the tail, Lambda = 1 still reproduces the merge
    top = rt.decompose_dense(merged - pre, top_k=3)
    assert top.rank == 3
    torch.testing.assert_close(top.s, torch.linalg.svdvals(merged - pre)[:3])


def test_rescaled_is_the_svd_of_the_rescaled_matrix():
    g = torch.Generator().manual_seed(2)
    spec = rt.decompose_dense(torch.randn(10, 7, generator=g, dtype=torch.float64), compute_dtype=torch.float64)
    lam = torch.tensor([1.0, -3.0, 0.2, 2.0, 0.0, 1.5, -0.1], dtype=torch.float64)
    new, order = spec.rescaled(lam)
    target = spec.matrix(lam)
    torch.testing.assert_close(new.s, torch.linalg.svdvals(target), rtol=0, atol=1e-12)
    torch.testing.assert_close(new.matrix(), target, rtol=0, atol=1e-12)
    assert bool((new.s[:-1] >= new.s[1:]).all())
    assert sorted(order.tolist()) == list(range(7))


def test_losses_match_hand_formulas():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 4, generator=g)
    labels = torch.tensor([0, 3, 1, 1, 2])
    p = torch.softmax(logits, -1)
    ent = float(-(p * p.log()).sum(-1).mean())  # eq. 14
    assert math.isclose(float(rt.classification_loss(logits, None, "entropy")), ent, rel_tol=1e-6)
    ce = float(-torch.log(p[torch.arange(5), labels]).mean())
    assert math.isclose(float(rt.classification_loss(logits, labels, "ce")), ce, rel_tol=1e-6)
    with pytest.raises(ValueError, match="needs labels"):
        rt.classification_loss(logits, None, "ce")
    # causal LM: position i predicts token i+1; -100 positions ignored
    seq = torch.randn(2, 5, 7, generator=g)
    tgt = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    terms, ents = [], []
    for b in range(2):
        for i in range(4):
            if tgt[b, i + 1] != -100:
                lp = torch.log_softmax(seq[b, i], -1)
                terms.append(-lp[tgt[b, i + 1]])
                ents.append(-(lp.exp() * lp).sum())
    assert math.isclose(float(rt.token_loss(seq, tgt, "ce", shift=True)), float(torch.stack(terms).mean()), rel_tol=1e-6)
    assert math.isclose(float(rt.token_loss(seq, tgt, "entropy", shift=True)), float(torch.stack(ents).mean()), rel_tol=1e-6)


# ----------------------------------------------------------------------------- tiny models
MLP = TinyMLP  # the tiny classifier of the LoRA-DV tests


def _setup(seed=0, noise=0.6):
    """A base model, a 'good' model fitted to data, and a poor merge = good + large noise on the
    difference vector of fc1/fc2 (relative to the base)."""
    torch.manual_seed(seed)
    base = MLP()
    good = MLP()
    good.load_state_dict(base.state_dict())
    x = torch.randn(64, 12)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    opt = torch.optim.Adam(good.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(good(x), y).backward()
        opt.step()
    merged = MLP()
    merged.load_state_dict(good.state_dict())
    with torch.no_grad():
        for n in ("fc1.weight", "fc2.weight"):
            p = dict(merged.named_parameters())[n]
            delta = p - dict(base.named_parameters())[n]
            p.copy_(dict(base.named_parameters())[n] + 2.5 * delta + noise * delta.std() * torch.randn_like(p))
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    return base, merged, batches, x, y


def _ce(forward, batch):
    x, y = batch
    return rt.classification_loss(forward(x), y, "ce")


def _ent(forward, batch):
    return rt.classification_loss(forward(batch[0]), None, "entropy")


LAYERS = ["fc1.weight", "fc2.weight"]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_epochs_zero_is_bit_exact():
    base, merged, batches, _, _ = _setup()
    before = _state(merged)
    res = rt.rethink(merged, _state(base), batches, _ce, layers=LAYERS, epochs=0, progress=False)
    after = _state(merged)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert res.changed == []
    assert all(bool((lam == 1).all()) for it in res.lambdas for lam in it.values())


def test_loss_decreases_and_u_v_frozen_and_manual_reconstruction():
    base, merged, batches, x, y = _setup()
    pre = _state(base)
    start = _state(merged)
    with torch.no_grad():
        loss_before = float(nn.functional.cross_entropy(merged(x), y))
    res = rt.rethink(merged, pre, batches, _ce, layers=LAYERS, iterations=3, epochs=10, lr=5e-2, progress=False)
    with torch.no_grad():
        loss_after = float(nn.functional.cross_entropy(merged(x), y))
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    assert len(res.losses) == 3 and all(len(l) == 10 for l in res.losses)
    # other parameters untouched
    for k in start:
        if k not in LAYERS:
            assert torch.equal(start[k], merged.state_dict()[k])
    for name in LAYERS:
        d0 = (start[name] - pre[name]).double()
        u, s, vh = torch.linalg.svd(d0, full_matrices=False)  # independent SVD of the input delta
        d1 = (merged.state_dict()[name] - pre[name]).double()
        # U and V never changed: the new delta is diagonal in the original singular bases
        core = u.T @ d1 @ vh.T
        off = core - torch.diag(torch.diagonal(core))
        assert float(off.abs().max()) < 1e-5 * float(s[0])
        # manual reconstruction from the learned overall gains
        gain = res.gains[name].double()
        torch.testing.assert_close(d1, (u * (gain * s)) @ vh, rtol=0, atol=1e-5 * float(s[0]))
        assert not torch.allclose(gain, torch.ones_like(gain))
        # product of per-iteration Lambdas, by hand, for the first iteration
        torch.testing.assert_close(res.sigmas[0][name].double(), s, rtol=1e-5, atol=1e-6)


def test_entropy_loss_decreases_and_is_deterministic():
    base, merged, batches, x, _ = _setup(seed=1)
    m2 = MLP()
    m2.load_state_dict(merged.state_dict())

    def ent_eval(m):
        p = torch.softmax(m(x), -1)
        return float(-(p * p.log()).sum(-1).mean())

    e0 = ent_eval(merged)
    rt.rethink(merged, _state(base), batches, _ent, layers=LAYERS, iterations=2, epochs=5, lr=5e-2, seed=7, progress=False)
    rt.rethink(m2, _state(base), batches, _ent, layers=LAYERS, iterations=2, epochs=5, lr=5e-2, seed=7, progress=False)
    assert ent_eval(merged) < e0
    for k, v in merged.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])


def test_scalar_and_random_ablations():
    base, merged, batches, _, _ = _setup()
    pre = _state(base)
    start = _state(merged)
    m = MLP()
    m.load_state_dict(start)
    res = rt.rethink(m, pre, batches, _ce, layers=LAYERS, mode="scalar", iterations=2, epochs=5, lr=5e-2, progress=False)
    assert all(lam.numel() == 1 for it in res.lambdas for lam in it.values())
    for name in LAYERS:
        d0, d1 = start[name] - pre[name], m.state_dict()[name] - pre[name]
        c = float((d1 * d0).sum() / (d0 * d0).sum())  # isotropic: d1 = c d0
        assert abs(c - 1) > 1e-4
        torch.testing.assert_close(d1, c * d0, rtol=0, atol=1e-5)
    runs = []
    for _ in range(2):
        m = MLP()
        m.load_state_dict(start)
        res = rt.rethink(m, pre, batches, _ce, layers=LAYERS, mode="random", iterations=1, random_range=(0.5, 1.5), seed=3, progress=False)
        runs.append(_state(m))
        lam = res.lambdas[0]["fc1.weight"]
        assert float(lam.min()) >= 0.5 and float(lam.max()) <= 1.5 and lam.numel() == 12
        d0 = (start["fc1.weight"] - pre["fc1.weight"]).double()
        u, s, vh = torch.linalg.svd(d0, full_matrices=False)
        torch.testing.assert_close(
            (m.state_dict()["fc1.weight"] - pre["fc1.weight"]).double(), (u * (lam.double() * s)) @ vh, rtol=0, atol=1e-5
        )
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_low_rank_path_equals_dense_path_and_dense_redecompose():
    torch.manual_seed(4)
    base = MLP()
    g = torch.Generator().manual_seed(5)
    lora = {
        n: rt.LowRankDelta(
            [0.3 * torch.randn(p.shape[0], 2, generator=g) for _ in range(3)],
            [0.3 * torch.randn(2, p.shape[1], generator=g) for _ in range(3)],
            [1.0, 0.5, -0.7],
        )
        for n, p in base.named_parameters()
        if n in LAYERS
    }
    merged = MLP()
    merged.load_state_dict(base.state_dict())
    with torch.no_grad():
        for n, p in merged.named_parameters():
            if n in lora:
                p.add_(lora[n].dense())
    x = torch.randn(48, 12, generator=g)
    y = torch.randint(0, 3, (48,), generator=g)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]
    results = {}
    for key, kwargs in {
        "lowrank": dict(low_rank=lora, layers=[]),
        "dense": dict(layers=LAYERS, top_k=6),  # rank of the LoRA sum is 6
        "dense_redecompose": dict(layers=LAYERS, top_k=6, redecompose="dense"),
    }.items():
        m = MLP()
        m.load_state_dict(merged.state_dict())
        res = rt.rethink(m, _state(base), batches, _ce, iterations=2, epochs=4, lr=2e-2, progress=False, **kwargs)
        results[key] = (_state(m), res)
    assert set(results["lowrank"][1].paths.values()) == {"low_rank"}
    assert set(results["dense"][1].paths.values()) == {"dense"}
    for name in LAYERS:
        a, b, c = (results[k][0][name] for k in ("lowrank", "dense", "dense_redecompose"))
        assert not torch.equal(a, merged.state_dict()[name])
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(b, c, rtol=0, atol=1e-5)


def test_bad_inputs_have_clear_errors():
    base, merged, batches, _, _ = _setup()
    with pytest.raises(ValueError, match="iterations"):
        rt.rethink(merged, _state(base), batches, _ce, iterations=0)
    with pytest.raises(ValueError, match="mode"):
        rt.rethink(merged, _state(base), batches, _ce, mode="foo")
    with pytest.raises(KeyError, match="no base"):
        rt.rethink(merged, {}, batches, _ce, layers=["fc1.weight"])
    with pytest.raises(ValueError, match="do not form"):
        rt.decompose_low_rank(rt.LowRankDelta([torch.ones(3, 2)], [torch.ones(3, 4)]))


def test_runs_under_no_grad_like_a_model_pool_loader():
    base, merged, batches, x, y = _setup()
    with torch.no_grad():
        before = float(nn.functional.cross_entropy(merged(x), y))
        rt.rethink(merged, _state(base), batches, _ce, layers=LAYERS, iterations=1, epochs=5, lr=5e-2, progress=False)
        assert float(nn.functional.cross_entropy(merged(x), y)) < before


# ----------------------------------------------------------------------------- contract details
def test_spectrum_keeps_its_dtype():
    """matrix() and rescaled() answer in the spectrum's dtype, whatever the dtype of Lambda; the
    rethought weight anchor + U diag(lam Sigma) V^T (eq. 8) is right in it."""
    g = torch.Generator().manual_seed(8)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    spec = rt.Spectrum(u=q[:, :3].bfloat16(), s=torch.tensor([3.0, 2.0, 1.0]).bfloat16(), v=q[:4, :3].bfloat16())
    lam = torch.tensor([0.5, -4.0, 1.0], dtype=torch.float64)
    assert spec.matrix(lam).dtype == torch.bfloat16
    new, order = spec.rescaled(lam)
    assert (new.u.dtype, new.s.dtype, new.v.dtype) == (torch.bfloat16,) * 3
    assert order.tolist() == [1, 0, 2] and new.s.float().tolist() == [8.0, 1.5, 1.0]
    anchor = torch.zeros(6, 4, dtype=torch.float64)
    spec32 = rt.Spectrum(u=q[:, :3].float(), s=torch.tensor([3.0, 2.0, 1.0]), v=q[:4, :3].float())
    w = (anchor + 1).float() + spec32.matrix(lam)
    assert w.dtype == torch.float32
    ref = 1 + (q[:, :3] * (lam * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))) @ q[:4, :3].T
    torch.testing.assert_close(w.double(), ref, rtol=0, atol=1e-6)


def test_decomposition_input_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"^layer: spectral rethinking needs a 2-D difference matrix, got shape \(2, 3, 4\)$"):
        rt.decompose_dense(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"^fc9: spectral rethinking needs a 2-D .* \(5,\)$"):
        rt.decompose_dense(torch.zeros(5), name="fc9")
    bad = torch.ones(3, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^fc9: the difference vector contains NaN or Inf$"):
        rt.decompose_dense(bad, name="fc9")
    with pytest.raises(ValueError, match=r"^top_k must be a positive integer or None, got 0$"):
        rt.decompose_dense(torch.ones(3, 4), top_k=0)
    with pytest.raises(ValueError, match=r"^layer: the low-rank factors contain NaN or Inf$"):
        rt.decompose_low_rank((bad[:, 1:3], torch.ones(2, 4)))
    with pytest.raises(ValueError, match=r"^lora_q: the low-rank factors contain NaN or Inf$"):
        rt.decompose_low_rank(rt.LowRankDelta([torch.ones(3, 2)], [bad[:2, :]]), name="lora_q")


def test_low_rank_delta_checks_its_factors():
    b, a = torch.ones(4, 2), torch.ones(2, 5)
    with pytest.raises(ValueError, match=r"^LowRankDelta needs as many B as A factors \(>= 1\), got 2 and 1$"):
        rt.LowRankDelta([b, b], [a])
    with pytest.raises(ValueError, match=r"^LowRankDelta needs as many B as A factors \(>= 1\), got 0 and 0$"):
        rt.LowRankDelta([], [])
    with pytest.raises(ValueError, match=r"^LowRankDelta: 1 weights for 2 factor pairs$"):
        rt.LowRankDelta([b, b], [a, a], [1.0])


def test_low_rank_fast_path_when_the_lora_ranks_exceed_a_dimension():
    """sum of LoRA ranks R larger than out (and than in): the R x R core is not square; the
    spectrum still has matching U, Sigma, V and is the dense SVD."""
    for out, inp in ((3, 20), (20, 4)):
        bs, as_, w = _low_rank_factors(out=out, inp=inp, ranks=(2, 3, 4), seed=9)
        dense = sum(wi * b @ a for wi, b, a in zip(w, bs, as_))
        spec = rt.decompose_low_rank(rt.LowRankDelta(bs, as_, w), compute_dtype=torch.float64)
        r = min(out, inp)
        assert spec.u.shape == (out, r) and spec.s.shape == (r,) and spec.v.shape == (inp, r)
        torch.testing.assert_close(spec.s, torch.linalg.svdvals(dense), rtol=0, atol=1e-10)
        torch.testing.assert_close(spec.matrix(), dense, rtol=0, atol=1e-10)


def test_loss_errors():
    logits = torch.randn(4, 5, 3)
    with pytest.raises(ValueError, match=r"^entropy_loss: the mask selects no position$"):
        rt.entropy_loss(logits, torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^the 'ce' loss needs labels; use loss='entropy' for unlabelled"):
        rt.classification_loss(logits[:, 0], None, "ce")
    with pytest.raises(ValueError, match=r"^loss must be one of \('ce', 'entropy'\), got 'mse'$"):
        rt.classification_loss(logits[:, 0], torch.zeros(4), "mse")
    with pytest.raises(ValueError, match=r"^the 'ce' loss needs target tokens \(labels\); use loss='entropy'"):
        rt.token_loss(logits, None, "ce")
    with pytest.raises(ValueError, match=r"^loss must be one of \('ce', 'entropy'\), got 'mse'$"):
        rt.token_loss(logits, None, "mse")
    with pytest.raises(ValueError, match=r"^token_loss: no target token in the batch \(every label is ignore_index\)$"):
        rt.token_loss(logits, torch.full((4, 5), -100), "ce")


@pytest.mark.parametrize(
    "name, dtype",
    [("float32", torch.float32), ("float64", torch.float64), ("torch.float64", torch.float64), ("Float32", torch.float32)],
)
def test_config_compute_dtype_by_name(name, dtype):
    assert rt.RethinkConfig(compute_dtype=name).compute_dtype is dtype


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("compute_dtype", "float16", r"^compute_dtype must be float32 or float64, got float16$"),
        ("compute_dtype", "bogus", r"^compute_dtype must be float32 or float64, got bogus$"),
        ("compute_dtype", torch.float16, r"^compute_dtype must be float32 or float64, got torch.float16$"),
        ("epochs", 1.5, r"^epochs must be a non-negative integer, got 1.5$"),
        ("epochs", -1, r"^epochs must be a non-negative integer, got -1$"),
        ("epochs", True, r"^epochs must be a non-negative integer, got True$"),
        ("lr", float("inf"), r"^lr must be a finite non-negative number, got inf$"),
        ("lr", -1e-3, r"^lr must be a finite non-negative number, got -0.001$"),
        ("lr", float("nan"), r"^lr must be a finite non-negative number, got nan$"),
        ("redecompose", "svd", r"^redecompose must be one of \('factored', 'dense'\), got 'svd'$"),
        ("top_k", 0, r"^top_k must be a positive integer or None, got 0$"),
        ("top_k", 2.5, r"^top_k must be a positive integer or None, got 2.5$"),
        ("random_range", (1.0, 0.5), r"^random_range must be \(low, high\) with low <= high, got \(1.0, 0.5\)$"),
        ("loss", "mse", r"^loss must be one of \('ce', 'entropy'\), got 'mse'$"),
        ("samples", 0, r"^samples must be a positive integer \(or None for all\), got 0$"),
        ("batch_size", 0, r"^batch_size must be a positive integer, got 0$"),
        ("iterations", 0, r"^iterations must be a positive integer, got 0$"),
        ("mode", "foo", r"^mode must be one of \('anisotropic', 'scalar', 'random'\), got 'foo'$"),
    ],
)
def test_config_validation_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        rt.RethinkConfig(**{field: value})


def test_config_accepts_its_boundaries():
    cfg = rt.RethinkConfig(epochs=0, lr=0, samples=None, random_range=(1.0, 1.0), top_k=1, batch_size=1)
    assert (cfg.epochs, cfg.lr, cfg.samples, cfg.random_range) == (0, 0, None, (1.0, 1.0))


def test_rethink_input_errors_name_the_layer():
    base, merged, batches, _, _ = _setup()
    pre = _state(base)
    with pytest.raises(KeyError, match=r"rethink: the model has no parameter 'fc3.weight'"):
        rt.rethink(merged, pre, batches, _ce, layers=["fc3.weight"], progress=False)
    bad = dict(pre, **{"fc1.weight": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match=r"^rethink: layer 'fc1.weight': base shape \(3, 4\) != merged shape \(16, 12\)$"):
        rt.rethink(merged, bad, batches, _ce, layers=["fc1.weight"], progress=False)
    nan = dict(pre, **{"fc2.weight": pre["fc2.weight"].clone()})
    nan["fc2.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^fc2.weight: the difference vector contains NaN or Inf$"):
        rt.rethink(merged, nan, batches, _ce, layers=LAYERS, progress=False)
    lora = rt.LowRankDelta([torch.full((16, 1), float("inf"))], [torch.ones(1, 12)])
    with pytest.raises(ValueError, match=r"^fc1.weight: the low-rank factors contain NaN or Inf$"):
        rt.rethink(merged, pre, batches, _ce, layers=[], low_rank={"fc1.weight": lora}, progress=False)


def test_calibration_errors():
    base, merged, batches, _, _ = _setup()
    pre = _state(base)
    with pytest.raises(ValueError, match=r"^rethink: the calibration set is empty$"):
        rt.rethink(merged, pre, [], _ce, layers=LAYERS, progress=False)
    for bad in (lambda f, b: nn.functional.cross_entropy(f(b[0]), b[1], reduction="none"), lambda f, b: 0.5):
        with pytest.raises(ValueError, match=r"^rethink: loss_fn must return a scalar tensor$"):
            rt.rethink(merged, pre, batches, bad, layers=LAYERS, progress=False)

    def nan_loss(forward, batch):
        return _ce(forward, batch) * float("nan")

    with pytest.raises(FloatingPointError, match=r"^rethink: non-finite calibration loss at iteration 1, epoch 1, batch 0 "
                                                 r"\(lr 0.005 too large\?\): lower the learning rate \(--lr\)$"):
        rt.rethink(merged, pre, batches, nan_loss, layers=LAYERS, shuffle=False, progress=False)


def test_no_layer_to_rethink_warns(caplog):
    base, _, batches, _, _ = _setup()
    caplog.set_level("WARNING", logger=rt.log.name)
    res = rt.rethink(base, _state(base), batches, _ce, layers=LAYERS, progress=False)
    assert res.layers == [] and res.lambdas == [] and res.config is not None
    msgs = [r.getMessage() for r in caplog.records if r.name == rt.log.name and r.levelname == "WARNING"]
    assert len(msgs) == 1 and "no layer to rethink" in msgs[0] and "2-D" in msgs[0]


def test_default_layers_are_the_2d_float_parameters_with_a_same_shape_base():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))  # 1-D: never a layer
            self.lin = nn.Linear(3, 4)  # weight 2-D (a layer), bias 1-D
            self.conv = nn.Conv1d(2, 2, 3)  # 3-D weight: not a layer
            self.codes = nn.Parameter(torch.zeros(4, 3, dtype=torch.int64), requires_grad=False)  # not floating
            self.emb = nn.Embedding(5, 3)  # 2-D: a layer
            self.out = nn.Linear(3, 2)  # excluded below
            self.extra = nn.Linear(3, 3, bias=False)  # no base tensor
            self.reshaped = nn.Linear(3, 5, bias=False)  # base of another shape

    model = Odd()
    base = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("extra")}
    base["reshaped.weight"] = torch.zeros(3, 5)
    assert rt.default_layers(model, base) == ["lin.weight", "emb.weight", "out.weight"]
    assert rt.default_layers(model, base, exclude=["out.weight", "nope"]) == ["lin.weight", "emb.weight"]

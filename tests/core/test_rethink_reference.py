"""LoRA-DV's learning step (``pave_plugins.core.rethink.rethink``) against an independent float64
implementation written here from the paper (arXiv "Spectral Rethinking ... via Difference Vector",
eq. 8-13, Sec. 4.2 and the implementation details: Adam, T iterations re-decomposing the
difference vector, Lambda initialised to 1 every iteration).

The reference uses only ``torch.linalg.svd``, autograd for the gradient of the loss and Adam written
out from Kingma & Ba (2015, Algorithm 1, defaults beta1 = 0.9, beta2 = 0.999, eps = 1e-8). It
shares no code with the implementation: its own forward pass, losses, decomposition, truncation
and optimiser. The tolerance (1e-9 on weights of order 1, float64 throughout) is far below what a
wrong learning rate or a different optimiser changes; ``test_tolerance_separates_wrong_updates``
shows that on the reference itself.
"""

from __future__ import annotations

import itertools
import logging
import re

import pytest
import torch
from tiny_models import TinyMLP
from torch import nn

from pave_plugins.core import rethink as rt

LAYERS = ("fc1.weight", "fc2.weight")
TOL = 1e-9
DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


class MLP(TinyMLP):
    def __init__(self, d=10, h=14, c=3):
        super().__init__(d, h, c)


def problem(seed=0):
    """theta_pre, theta_merged (random difference vectors of decaying spectra) and two batches."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = MLP().double()
    pre = {k: v.detach().clone() for k, v in base.state_dict().items()}
    merged = {k: v.clone() for k, v in pre.items()}
    for name in LAYERS:
        out, inp = merged[name].shape
        u, _ = torch.linalg.qr(torch.randn(out, out, generator=g, dtype=DT))
        v, _ = torch.linalg.qr(torch.randn(inp, inp, generator=g, dtype=DT))
        r = min(out, inp)
        s = 0.8 * torch.logspace(0, -1.5, r, dtype=DT)
        merged[name] = pre[name] + (u[:, :r] * s) @ v[:, :r].T
    x = torch.randn(24, 10, generator=g, dtype=DT)
    y = torch.randint(0, 3, (24,), generator=g)
    batches = [(x[:12], y[:12]), (x[12:], y[12:])]
    return pre, merged, batches


# ----------------------------------------------------------------------------- the reference
def ref_forward(w, x):
    h = torch.tanh(x @ w["fc1.weight"].T + w["fc1.bias"])
    h = torch.tanh(h @ w["fc2.weight"].T + w["fc2.bias"])
    return h @ w["head.weight"].T + w["head.bias"]


def ref_loss(logits, y, kind):
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    if kind == "ce":
        return -logp[torch.arange(len(y)), y].mean()
    return -(logp.exp() * logp).sum(dim=1).mean()  # eq. 14


def ref_svd(delta, top_k):
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = len(s) if top_k is None else top_k
    return u[:, :k], s[:k], vh[:k], (u[:, k:] * s[k:]) @ vh[k:]


class RefAdam:
    """Kingma & Ba, Algorithm 1, kept per Lambda (or plain SGD, for the separation check): a Lambda
    that a batch's loss does not depend on (gradient ``None``) is not updated and its step count
    does not advance."""

    def __init__(self, lr, kind="adam", b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.kind, self.b1, self.b2, self.eps = lr, kind, b1, b2, eps
        self.t, self.m, self.v = {}, {}, {}

    def step(self, lam, grad):
        for n, g in grad.items():
            if g is None:
                continue
            self.t[n] = self.t.get(n, 0) + 1
            if self.kind == "sgd":
                lam[n] = lam[n] - self.lr * g
                continue
            self.m[n] = self.b1 * self.m.get(n, torch.zeros_like(g)) + (1 - self.b1) * g
            self.v[n] = (
                self.b2 * self.v.get(n, torch.zeros_like(g)) + (1 - self.b2) * g * g
            )
            m_hat = self.m[n] / (1 - self.b1 ** self.t[n])
            v_hat = self.v[n] / (1 - self.b2 ** self.t[n])
            lam[n] = lam[n] - self.lr * m_hat / (v_hat.sqrt() + self.eps)


def reference_lora_dv(
    pre,
    merged,
    batches,
    *,
    iterations,
    epochs,
    lr,
    loss="ce",
    scalar=False,
    top_k=None,
    keep_tail=False,
    optimizer="adam",
    layers=LAYERS,
    batch_loss=None,
    orders=None,
):
    """Eq. 8-13: per iteration t, SVD of theta^(t) - anchor, Lambda = 1, Adam on the loss of
    anchor + U diag(Lambda * Sigma) V^T (all ``layers`` jointly), one step per batch, in order
    (or in ``orders[t][epoch]``); the anchor is theta_pre, plus (keep_tail) the components beyond
    top_k of the first SVD. ``batch_loss(weights, batch)`` replaces the MLP's ``loss``."""
    if batch_loss is None:
        def batch_loss(w, batch):
            return ref_loss(ref_forward(w, batch[0]), batch[1], loss)
    theta = {n: merged[n].clone() for n in layers}
    anchor = {}
    for n in layers:
        *_, tail = ref_svd(merged[n] - pre[n], top_k)
        anchor[n] = pre[n] + tail if keep_tail else pre[n].clone()
    lambdas, losses = [], []
    for t in range(iterations):
        spectra = {n: ref_svd(theta[n] - anchor[n], top_k)[:3] for n in layers}
        lam = {
            n: torch.ones(1 if scalar else len(spectra[n][1]), dtype=DT) for n in layers
        }
        opt = RefAdam(lr, optimizer)
        epoch_losses = []
        for e in range(epochs):
            order = range(len(batches)) if orders is None else orders[t][e]
            total = 0.0
            for i in order:
                leaves = {n: lam[n].clone().requires_grad_(True) for n in layers}
                w = dict(merged)
                for n, (u, s, vh) in spectra.items():
                    w[n] = anchor[n] + (u * (leaves[n] * s)) @ vh
                value = batch_loss(w, batches[i])
                grads = torch.autograd.grad(value, [leaves[n] for n in layers], allow_unused=True)
                opt.step(lam, dict(zip(layers, grads)))
                total += float(value.detach())
            epoch_losses.append(total / len(order))
        for n, (u, s, vh) in spectra.items():
            theta[n] = anchor[n] + (u * (lam[n] * s)) @ vh
        lambdas.append(lam)
        losses.append(epoch_losses)
    return theta, lambdas, losses


# ----------------------------------------------------------------------------- ours
def ours(pre, merged, batches, *, loss="ce", **kwargs):
    model = MLP().double()
    model.load_state_dict(merged)

    def loss_fn(forward, batch):
        x, y = batch
        return ref_loss(forward(x), y, loss)

    kwargs = {"layers": list(LAYERS), "compute_dtype": DT, "shuffle": False, "progress": False, **kwargs}
    res = rt.rethink(model, pre, batches, loss_fn, **kwargs)
    return {k: v.detach() for k, v in model.state_dict().items()}, res


def max_diff(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in LAYERS)


CASES = {
    "anisotropic_ce": {},
    "anisotropic_entropy": {"loss": "entropy"},
    "anisotropic_redecompose_dense": {"redecompose": "dense"},
    "scalar": {"mode": "scalar"},
    "top_k_drop_tail": {"top_k": 5},
    "top_k_keep_tail": {"top_k": 5, "keep_tail": True},
    "top_k_keep_tail_redecompose_dense": {
        "top_k": 5,
        "keep_tail": True,
        "redecompose": "dense",
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_independent_reference(case):
    kwargs = dict(CASES[case])
    pre, merged, batches = problem()
    hyper = {"iterations": 3, "epochs": 3, "lr": 2e-2}
    ref_kwargs = {
        k: v for k, v in kwargs.items() if k in ("loss", "top_k", "keep_tail")
    }
    ref_theta, ref_lams, ref_losses = reference_lora_dv(
        pre,
        merged,
        batches,
        scalar=kwargs.get("mode") == "scalar",
        **ref_kwargs,
        **hyper,
    )
    got, res = ours(pre, merged, batches, **kwargs, **hyper)
    assert max_diff(got, ref_theta) < TOL, max_diff(got, ref_theta)
    # every learned Lambda (in the order of that iteration's singular values) and every epoch's loss
    for t in range(3):
        for n in LAYERS:
            torch.testing.assert_close(
                res.lambdas[t][n], ref_lams[t][n], rtol=0, atol=TOL
            )
        assert res.losses[t] == pytest.approx(ref_losses[t], rel=1e-12)
    # the layers that are not rethought are the merged ones, bit for bit
    for k in merged:
        if k not in LAYERS:
            assert torch.equal(got[k], merged[k]), k
    # the reference moved the weights well beyond the tolerance (the comparison is not vacuous)
    assert max_diff(ref_theta, merged) > 1e5 * TOL


def test_tolerance_separates_wrong_updates():
    """A 0.3x learning rate, plain SGD, one iteration instead of three, or a dropped tail each move
    the reference's result by many orders of magnitude more than the tolerance."""
    pre, merged, batches = problem()
    hyper = {"iterations": 3, "epochs": 3, "lr": 2e-2}
    right, *_ = reference_lora_dv(pre, merged, batches, **hyper)
    wrong = {
        "lr x 0.3": reference_lora_dv(
            pre, merged, batches, **{**hyper, "lr": 0.3 * hyper["lr"]}
        )[0],
        "sgd": reference_lora_dv(pre, merged, batches, optimizer="sgd", **hyper)[0],
        "T = 1": reference_lora_dv(pre, merged, batches, **{**hyper, "iterations": 1})[
            0
        ],
    }
    for label, theta in wrong.items():
        assert max_diff(theta, right) > 1e4 * TOL, label
    keep, *_ = reference_lora_dv(pre, merged, batches, top_k=5, keep_tail=True, **hyper)
    drop, *_ = reference_lora_dv(pre, merged, batches, top_k=5, **hyper)
    assert max_diff(keep, drop) > 1e4 * TOL


def test_keep_tail_with_zero_learning_rate_is_the_input_merge():
    """lr = 0: Lambda stays 1, and with keep_tail the frozen anchor holds the discarded components,
    so the weights are theta_merged exactly, whatever top_k."""
    pre, merged, batches = problem()
    for top_k in (1, 4, 9):
        got, res = ours(
            pre,
            merged,
            batches,
            iterations=2,
            epochs=2,
            lr=0.0,
            top_k=top_k,
            keep_tail=True,
        )
        assert res.changed == []
        for n in LAYERS:
            assert torch.equal(got[n], merged[n])
            assert res.lambdas[-1][n].numel() == top_k


@pytest.mark.parametrize("hyper", [{"epochs": 2, "lr": 0.0}, {"epochs": 0, "lr": 2e-2}])
def test_top_k_drops_the_tail_even_when_lambda_stays_one(hyper):
    """Without keep_tail, top_k means the rethought weights are theta_pre + the top-k components
    (eq. 13 with the truncated SVD), also when Lambda never moves from 1 (lr 0, or 0 epochs)."""
    pre, merged, batches = problem()
    ref_theta, *_ = reference_lora_dv(pre, merged, batches, iterations=2, top_k=3, **hyper)
    got, res = ours(pre, merged, batches, iterations=2, top_k=3, **hyper)
    assert max_diff(got, ref_theta) < TOL and max_diff(ref_theta, merged) > 1e5 * TOL
    assert sorted(res.changed) == sorted(LAYERS)


# ----------------------------------------------------------------------------- more of the contract
# Every test below compares with the float64 reference above (or with a variant of it written out
# here), never with the implementation's own helpers.
INFO_RE = re.compile(
    r"rethink: (\d+) layers \((\d+) low-rank fast path\), (\d+) Lambda parameters, "
    r"mode=(\w+), T=(\d+), epochs=(\d+), lr=(\S+)"
)
ITER_RE = re.compile(r"rethink: iteration (\d+)/(\d+), loss (\S+) -> (\S+)")
EPOCH_RE = re.compile(r"rethink: iteration (\d+) epoch (\d+) loss (\S+)")


def _messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == rt.log.name]


def _check_logs(caplog, *, layers, low_rank, n_lambda, mode, iterations, epochs, lr, ref_losses):
    """The summary line, one line per iteration (first and last epoch loss) and one debug line per
    epoch, with the reference's numbers."""
    msgs = _messages(caplog)
    info = [m for m in msgs if INFO_RE.fullmatch(m)]
    assert len(info) == 1, msgs
    got = INFO_RE.fullmatch(info[0]).groups()
    assert [int(v) for v in got[:3]] == [layers, low_rank, n_lambda], info[0]
    assert got[3] == mode and [int(got[4]), int(got[5])] == [iterations, epochs], info[0]
    assert float(got[6]) == pytest.approx(lr, rel=1e-5)
    per_iter = [ITER_RE.fullmatch(m).groups() for m in msgs if ITER_RE.fullmatch(m)]
    assert [(int(a), int(b)) for a, b, *_ in per_iter] == [(t + 1, iterations) for t in range(iterations)]
    for (_, _, first, last), ref in zip(per_iter, ref_losses):
        assert float(first) == pytest.approx(ref[0], rel=1e-5) and float(last) == pytest.approx(ref[-1], rel=1e-5)
    per_epoch = [EPOCH_RE.fullmatch(m).groups() for m in msgs if EPOCH_RE.fullmatch(m)]
    want = [(t + 1, e + 1, ref_losses[t][e]) for t in range(iterations) for e in range(epochs)]
    assert [(int(a), int(b)) for a, b, _ in per_epoch] == [w[:2] for w in want], per_epoch
    for (_, _, value), w in zip(per_epoch, want):
        assert float(value) == pytest.approx(w[2], rel=1e-5)


@pytest.mark.parametrize("case", ["anisotropic_ce", "scalar", "top_k_keep_tail"])
def test_log_lines_report_the_reference_numbers(case, caplog):
    """The INFO summary (layers, low-rank layers, number of Lambda parameters: rank or top_k per
    layer, 1 per layer for the scalar ablation), per-iteration and per-epoch losses."""
    caplog.set_level(logging.DEBUG, logger=rt.log.name)
    kwargs = dict(CASES[case])
    pre, merged, batches = problem()
    hyper = {"iterations": 2, "epochs": 3, "lr": 2e-2}
    scalar = kwargs.get("mode") == "scalar"
    _, _, ref_losses = reference_lora_dv(
        pre, merged, batches, scalar=scalar, **{k: v for k, v in kwargs.items() if k != "mode"}, **hyper
    )
    ours(pre, merged, batches, **kwargs, **hyper)
    ranks = [min(merged[n].shape) for n in LAYERS]
    n_lambda = len(LAYERS) if scalar else sum(min(r, kwargs.get("top_k") or r) for r in ranks)
    mode = "scalar" if scalar else "anisotropic"
    _check_logs(caplog, layers=2, low_rank=0, n_lambda=n_lambda, mode=mode, ref_losses=ref_losses, **hyper)


def test_config_object_default_layers_and_result_record():
    """A RethinkConfig passed as ``config`` is used (and recorded); without ``layers`` every 2-D
    parameter with a base is a candidate, and those whose difference vector is zero (the head) are
    skipped."""
    pre, merged, batches = problem()
    hyper = {"iterations": 2, "epochs": 2, "lr": 2e-2}
    ref_theta, ref_lams, _ = reference_lora_dv(pre, merged, batches, **hyper)
    model = MLP().double()
    model.load_state_dict(merged)
    cfg = rt.RethinkConfig(compute_dtype=DT, shuffle=False, progress=False, **hyper)

    def loss_fn(forward, batch):
        return ref_loss(forward(batch[0]), batch[1], "ce")

    res = rt.rethink(model, pre, batches, loss_fn, config=cfg)
    got = {k: v.detach() for k, v in model.state_dict().items()}
    assert max_diff(got, ref_theta) < TOL and max_diff(ref_theta, merged) > 1e5 * TOL
    assert res.layers == list(LAYERS) and sorted(res.changed) == sorted(LAYERS)
    assert res.paths == {n: "dense" for n in LAYERS}
    assert res.config is not None and (res.config.iterations, res.config.epochs, res.config.lr) == (2, 2, 2e-2)
    assert res.config.compute_dtype == DT
    for t in range(2):
        for n in LAYERS:
            torch.testing.assert_close(res.lambdas[t][n], ref_lams[t][n], rtol=0, atol=TOL)
    assert torch.equal(got["head.weight"], merged["head.weight"])


def _low_rank_problem(seed=3, dtype=torch.float32):
    """theta_merged = theta_pre + sum_i w_i B_i A_i on fc1 and fc2 (factors stored in ``dtype``)."""
    pre, _, batches = problem(seed)
    g = torch.Generator().manual_seed(seed + 100)
    lora, merged = {}, dict(pre)
    for n in LAYERS:
        out, inp = pre[n].shape
        b = [0.4 * torch.randn(out, 2, generator=g, dtype=dtype) for _ in range(3)]
        a = [0.4 * torch.randn(2, inp, generator=g, dtype=dtype) for _ in range(3)]
        w = [1.0, -0.6, 0.8]
        lora[n] = rt.LowRankDelta(b, a, w)
        merged[n] = pre[n] + sum(wi * bi.to(DT) @ ai.to(DT) for wi, bi, ai in zip(w, b, a))
    return pre, merged, batches, lora


def test_low_rank_path_with_keep_tail_and_a_zero_layer_first(caplog):
    """Low-rank fast path, top_k with keep_tail: the anchor holds the exact (float64) tail of the
    LoRA sum; a listed layer with a zero difference vector (before the others) is skipped."""
    caplog.set_level(logging.DEBUG, logger=rt.log.name)
    pre, merged, batches, lora = _low_rank_problem()
    hyper = {"iterations": 2, "epochs": 2, "lr": 2e-2}
    ref_theta, ref_lams, ref_losses = reference_lora_dv(pre, merged, batches, top_k=3, keep_tail=True, **hyper)
    got, res = ours(pre, merged, batches, layers=["head.weight"], low_rank=lora, top_k=3, keep_tail=True, **hyper)
    assert max_diff(got, ref_theta) < TOL and max_diff(ref_theta, merged) > 1e5 * TOL
    assert res.layers == list(LAYERS) and res.paths == {n: "low_rank" for n in LAYERS}
    for t in range(2):
        for n in LAYERS:
            torch.testing.assert_close(res.lambdas[t][n], ref_lams[t][n], rtol=0, atol=TOL)
    _check_logs(caplog, layers=2, low_rank=2, n_lambda=6, mode="anisotropic", ref_losses=ref_losses, **hyper)
    skipped = [m for m in _messages(caplog) if "zero difference vector" in m]
    assert skipped == ["rethink: layer head.weight has a zero difference vector, skipped"]


def ours_on(model, pre, batches, loss_fn, **kwargs):
    kwargs = {"shuffle": False, "progress": False, **kwargs}
    res = rt.rethink(model, pre, batches, loss_fn, **kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, res


def test_float32_model_float64_compute_single_batch():
    """compute_dtype float64 on a float32 model: Lambda, Sigma in float64, the weights handed to
    the model and written back in float32; one calibration batch is a valid calibration set."""
    pre, merged, batches = problem(seed=4)
    pre32 = {k: v.float() for k, v in pre.items()}
    merged32 = {k: v.float() for k, v in merged.items()}
    one = [batches[0]]
    hyper = {"iterations": 2, "epochs": 3, "lr": 2e-2}
    ref_theta, ref_lams, _ = reference_lora_dv(
        {k: v.double() for k, v in pre32.items()}, {k: v.double() for k, v in merged32.items()}, one, **hyper
    )
    model = MLP()
    model.load_state_dict(merged32)

    def loss_fn(forward, batch):
        return ref_loss(forward(batch[0].float()).double(), batch[1], "ce")

    got, res = ours_on(model, pre32, one, loss_fn, layers=list(LAYERS), compute_dtype=DT, **hyper)
    for n in LAYERS:
        assert got[n].dtype == torch.float32
        assert res.lambdas[-1][n].dtype == DT and res.sigmas[-1][n].dtype == DT
        torch.testing.assert_close(got[n].double(), ref_theta[n], rtol=0, atol=1e-5)
        torch.testing.assert_close(res.lambdas[-1][n], ref_lams[-1][n], rtol=0, atol=1e-4)
    assert max_diff(ref_theta, {k: v.double() for k, v in merged32.items()}) > 1e-2


def _ce_weights(w, batch):
    return ref_loss(ref_forward(w, batch[0]), batch[1], "ce")


def _ce_forward(forward, batch):
    return ref_loss(forward(batch[0]), batch[1], "ce")


def test_shuffle_visits_every_batch_once_per_epoch():
    """shuffle=True: each epoch is one pass over the batches in some order; the result is the
    reference run in exactly one of the possible orders, and not the natural order every epoch."""
    pre, merged, batches = problem(seed=5)
    batches = [batches[0], batches[1], (batches[0][0][:5], batches[0][1][:5])]
    hyper = {"iterations": 1, "epochs": 2, "lr": 5e-2}
    model = MLP().double()
    model.load_state_dict(merged)
    got, _ = ours_on(model, pre, batches, _ce_forward, layers=list(LAYERS), shuffle=True, seed=2, compute_dtype=DT, **hyper)
    perms = list(itertools.permutations(range(3)))
    matches = []
    for orders in itertools.product(perms, repeat=2):
        theta, *_ = reference_lora_dv(pre, merged, batches, layers=LAYERS, batch_loss=_ce_weights, orders=[list(orders)], **hyper)
        if max_diff(theta, got) < TOL:
            matches.append(orders)
    assert len(matches) == 1 and matches[0] != ((0, 1, 2), (0, 1, 2)), matches


class SkipMLP(MLP):
    def forward(self, x, skip_fc2=False):
        h = torch.tanh(self.fc1(x))
        return self.head(h if skip_fc2 else torch.tanh(self.fc2(h)))


def test_keyword_arguments_reach_the_model_and_unreached_lambdas_stay():
    """forward(x, skip_fc2=True) passes the keyword to the model; a batch that does not reach fc2
    gives its Lambda no gradient, and Adam leaves that Lambda (and its moments) alone."""
    pre, merged, batches = problem(seed=6)
    batches = [(x, y, skip) for (x, y), skip in zip(batches, (False, True))]

    def ref_batch_loss(w, batch):
        x, y, skip = batch
        h = torch.tanh(x @ w["fc1.weight"].T + w["fc1.bias"])
        if not skip:
            h = torch.tanh(h @ w["fc2.weight"].T + w["fc2.bias"])
        return ref_loss(h @ w["head.weight"].T + w["head.bias"], y, "ce")

    def loss_fn(forward, batch):
        x, y, skip = batch
        return ref_loss(forward(x, skip_fc2=skip), y, "ce")

    hyper = {"iterations": 2, "epochs": 3, "lr": 3e-2}
    ref_theta, ref_lams, _ = reference_lora_dv(pre, merged, batches, layers=LAYERS, batch_loss=ref_batch_loss, **hyper)
    model = SkipMLP().double()
    model.load_state_dict(merged)
    got, res = ours_on(model, pre, batches, loss_fn, layers=list(LAYERS), compute_dtype=DT, **hyper)
    assert max_diff(got, ref_theta) < TOL and max_diff(ref_theta, merged) > 1e5 * TOL
    for t in range(2):
        for n in LAYERS:
            torch.testing.assert_close(res.lambdas[t][n], ref_lams[t][n], rtol=0, atol=TOL)


class TiedMLP(nn.Module):
    """fc2 reuses fc1's weight (one parameter under two names, like tied embeddings)."""

    def __init__(self, d=10, c=3):
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)
        self.fc2.weight = self.fc1.weight
        self.head = nn.Linear(d, c)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def test_tied_weight_rethought_under_its_second_name():
    """A tied parameter named by its alias (fc2.weight) is rethought once and used in both places."""
    torch.manual_seed(7)
    g = torch.Generator().manual_seed(7)
    model = TiedMLP().double()
    pre = {k: v.detach().clone() for k, v in model.state_dict().items()}
    delta = 0.3 * torch.randn(10, 10, generator=g, dtype=DT)
    merged = dict(pre)
    merged["fc1.weight"] = merged["fc2.weight"] = pre["fc1.weight"] + delta
    x = torch.randn(16, 10, generator=g, dtype=DT)
    y = torch.randint(0, 3, (16,), generator=g)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]

    def ref_batch_loss(w, batch):
        h = torch.tanh(batch[0] @ w["fc2.weight"].T + w["fc1.bias"])
        h = torch.tanh(h @ w["fc2.weight"].T + w["fc2.bias"])
        return ref_loss(h @ w["head.weight"].T + w["head.bias"], batch[1], "ce")

    hyper = {"iterations": 2, "epochs": 2, "lr": 3e-2}
    ref_theta, *_ = reference_lora_dv(pre, merged, batches, layers=["fc2.weight"], batch_loss=ref_batch_loss, **hyper)
    model.load_state_dict(merged)
    _, res = ours_on(model, pre, batches, _ce_forward, layers=["fc2.weight"], compute_dtype=DT, **hyper)
    assert res.layers == ["fc2.weight"]
    assert model.fc1.weight is model.fc2.weight
    got = model.fc1.weight.detach()
    assert float((got - ref_theta["fc2.weight"]).abs().max()) < TOL
    assert float((ref_theta["fc2.weight"] - merged["fc2.weight"]).abs().max()) > 1e5 * TOL


def test_dense_redecompose_gains():
    """redecompose='dense': with T = 1 the overall gains are the learned Lambda (no
    re-decomposition happened); from the first re-decomposition on, components no longer map onto
    the first decomposition and the gains are NaN."""
    pre, merged, batches = problem()
    hyper = {"epochs": 2, "lr": 2e-2}
    _, ref_lams, _ = reference_lora_dv(pre, merged, batches, iterations=1, **hyper)
    _, res = ours(pre, merged, batches, iterations=1, redecompose="dense", **hyper)
    for n in LAYERS:
        torch.testing.assert_close(res.gains[n], ref_lams[0][n], rtol=0, atol=TOL)
    _, res = ours(pre, merged, batches, iterations=2, redecompose="dense", **hyper)
    assert all(bool(torch.isnan(res.gains[n]).all()) for n in LAYERS)


def test_progress_bars_get_descriptions_and_reference_losses():
    """A progress bar (e.g. tqdm) wraps the iterations and each iteration's epochs; their postfix
    is the last epoch's / each epoch's loss. progress=False never calls it, and progress=True
    without a bar runs without one."""
    pre, merged, batches = problem()
    hyper = {"iterations": 2, "epochs": 3, "lr": 2e-2}
    _, _, ref_losses = reference_lora_dv(pre, merged, batches, **hyper)
    bars = []

    class Bar:
        def __init__(self, it, desc):
            self.it, self.desc, self.postfix = list(it), desc, []
            bars.append(self)

        def __iter__(self):
            return iter(self.it)

        def set_postfix(self, **kw):
            self.postfix.append(kw)

    got, _ = ours(pre, merged, batches, progress=True, progress_bar=Bar, **hyper)
    assert [b.desc for b in bars] == ["rethink iterations", "rethink iteration 1/2", "rethink iteration 2/2"]
    assert bars[0].it == [0, 1] and all(b.it == [0, 1, 2] for b in bars[1:])
    fmt = [[f"{v:.4g}" for v in ref] for ref in ref_losses]
    assert bars[0].postfix == [{"loss": f[-1]} for f in fmt]
    for b, f in zip(bars[1:], fmt):
        assert b.postfix == [{"loss": v} for v in f]
    bars.clear()
    quiet, _ = ours(pre, merged, batches, progress=False, progress_bar=Bar, **hyper)
    assert bars == [] and max_diff(quiet, got) == 0
    model = MLP().double()
    model.load_state_dict(merged)
    default, _ = ours_on(model, pre, batches, _ce_forward, layers=list(LAYERS), compute_dtype=DT, progress=True, **hyper)
    assert max_diff(default, got) == 0


def test_model_is_frozen_in_eval_mode_during_rethinking_and_restored():
    """While Lambda is learned the model is in eval mode and none of its own parameters requires a
    gradient (so none gets a .grad); afterwards training mode and requires_grad are restored."""
    pre, merged, batches = problem()
    model = MLP().double()
    model.load_state_dict(merged)
    model.train()
    model.head.bias.requires_grad_(False)
    seen = []

    def loss_fn(forward, batch):
        seen.append((forward.model.training, [p.requires_grad for p in model.parameters()]))
        return _ce_forward(forward, batch)

    ours_on(model, pre, batches, loss_fn, layers=list(LAYERS), compute_dtype=DT, iterations=1, epochs=2, lr=2e-2)
    assert seen and all(not training and not any(req) for training, req in seen)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {
        n: n != "head.bias" for n, _ in model.named_parameters()
    }
    assert all(p.grad is None for p in model.parameters())


def test_random_ablation_draws_uniform_lambdas_and_rescales():
    """mode='random' (Table 4): every iteration draws Lambda uniformly in random_range (no
    training, no loss), reproducibly for a seed; the weights are the reference's rescaling by those
    Lambdas, iteration after iteration."""
    pre, merged, batches = problem()
    lo, hi = -1.0, 3.0
    _, res = ours(pre, merged, batches, mode="random", iterations=3, random_range=(lo, hi), seed=5)
    got, again = ours(pre, merged, batches, mode="random", iterations=3, random_range=(lo, hi), seed=5)
    _, other = ours(pre, merged, batches, mode="random", iterations=3, random_range=(lo, hi), seed=6)
    draws = torch.cat([lam for it in res.lambdas for lam in it.values()])
    assert draws.numel() == 3 * sum(min(merged[n].shape) for n in LAYERS)
    assert float(draws.min()) >= lo and float(draws.max()) <= hi
    assert float(draws.min()) < lo + 0.5 and float(draws.max()) > hi - 0.5  # P(fail) < 1e-8
    assert abs(float(draws.mean()) - (lo + hi) / 2) < 0.4
    assert all(torch.equal(res.lambdas[t][n], again.lambdas[t][n]) for t in range(3) for n in LAYERS)
    assert not torch.equal(res.lambdas[0]["fc1.weight"], other.lambdas[0]["fc1.weight"])
    assert res.losses == [[], [], []]
    theta = {n: merged[n].clone() for n in LAYERS}
    for t in range(3):
        for n in LAYERS:
            u, s, vh, _ = ref_svd(theta[n] - pre[n], None)
            torch.testing.assert_close(res.sigmas[t][n], s, rtol=0, atol=1e-12)
            theta[n] = pre[n] + (u * (res.lambdas[t][n] * s)) @ vh
    assert max_diff(got, theta) < TOL


def test_lambda_tensors_file_layout():
    """lambda_tensors(): ``<layer>.lambda.<t>``, ``<layer>.sigma.<t>`` (the reference's Lambda and
    singular values of iteration t) and ``<layer>.gain`` (the product of the per-iteration Lambdas
    on the first decomposition's components), float32, contiguous, on the CPU."""
    pre, merged, batches = problem()
    hyper = {"iterations": 2, "epochs": 2, "lr": 2e-2}
    _, ref_lams, _ = reference_lora_dv(pre, merged, batches, **hyper)
    _, res = ours(pre, merged, batches, **hyper)
    flat = res.lambda_tensors()
    want = {f"{n}.{kind}.{t}" for n in LAYERS for kind in ("lambda", "sigma") for t in range(2)}
    assert set(flat) == want | {f"{n}.gain" for n in LAYERS}
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" and v.is_contiguous() for v in flat.values())
    for n in LAYERS:
        s0 = torch.linalg.svdvals(merged[n] - pre[n])
        for t in range(2):
            torch.testing.assert_close(flat[f"{n}.lambda.{t}"], ref_lams[t][n].float(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(flat[f"{n}.sigma.0"], s0.float(), rtol=1e-6, atol=1e-7)
        # iteration 1 re-decomposes pre + U diag(Lambda_0 Sigma_0) V^T: its singular values are |Lambda_0 Sigma_0|, sorted
        s1 = torch.sort((ref_lams[0][n] * s0).abs(), descending=True).values
        torch.testing.assert_close(flat[f"{n}.sigma.1"], s1.float(), rtol=1e-6, atol=1e-7)
        # gain of component j of the first decomposition: Lambda_0[j] times the Lambda_1 of the
        # component it became (the one with the same |Lambda_0 sigma| rank)
        rank_of = torch.argsort(torch.argsort((ref_lams[0][n] * s0).abs(), descending=True, stable=True), stable=True)
        gain = ref_lams[0][n] * ref_lams[1][n][rank_of]
        torch.testing.assert_close(flat[f"{n}.gain"], gain.float(), rtol=1e-6, atol=1e-7)


def test_forward_params_replace_a_tensor_for_one_call():
    """forward(x, params={...}) runs the model with those tensors (e.g. a task's own head) on top of
    the rethought weights: the reference computes the loss with that head."""
    pre, merged, batches = problem(seed=8)
    g = torch.Generator().manual_seed(80)
    task_head = {
        "head.weight": torch.randn(3, 14, generator=g, dtype=DT),
        "head.bias": torch.randn(3, generator=g, dtype=DT),
    }

    def ref_batch_loss(w, batch):
        return _ce_weights({**w, **task_head}, batch)

    def loss_fn(forward, batch):
        return ref_loss(forward(batch[0], params=task_head), batch[1], "ce")

    hyper = {"iterations": 2, "epochs": 2, "lr": 3e-2}
    ref_theta, *_ = reference_lora_dv(pre, merged, batches, layers=LAYERS, batch_loss=ref_batch_loss, **hyper)
    other, *_ = reference_lora_dv(pre, merged, batches, layers=LAYERS, batch_loss=_ce_weights, **hyper)
    model = MLP().double()
    model.load_state_dict(merged)
    got, _ = ours_on(model, pre, batches, loss_fn, layers=list(LAYERS), compute_dtype=DT, **hyper)
    assert max_diff(got, ref_theta) < TOL and max_diff(other, ref_theta) > 1e5 * TOL
    assert torch.equal(got["head.weight"], merged["head.weight"])

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

import pytest
import torch
from torch import nn

from pave_plugins.core import rethink as rt

LAYERS = ("fc1.weight", "fc2.weight")
TOL = 1e-9
DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class MLP(nn.Module):
    def __init__(self, d=10, h=14, c=3):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, h)
        self.head = nn.Linear(h, c)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


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
    """Kingma & Ba, Algorithm 1 (or plain SGD, for the separation check)."""

    def __init__(self, lr, kind="adam", b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.kind, self.b1, self.b2, self.eps = lr, kind, b1, b2, eps
        self.t, self.m, self.v = 0, {}, {}

    def step(self, lam, grad):
        self.t += 1
        for n, g in grad.items():
            if self.kind == "sgd":
                lam[n] = lam[n] - self.lr * g
                continue
            self.m[n] = self.b1 * self.m.get(n, torch.zeros_like(g)) + (1 - self.b1) * g
            self.v[n] = (
                self.b2 * self.v.get(n, torch.zeros_like(g)) + (1 - self.b2) * g * g
            )
            m_hat = self.m[n] / (1 - self.b1**self.t)
            v_hat = self.v[n] / (1 - self.b2**self.t)
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
):
    """Eq. 8-13: per iteration t, SVD of theta^(t) - anchor, Lambda = 1, Adam on the loss of
    anchor + U diag(Lambda * Sigma) V^T (all layers jointly), one step per batch, in order; the
    anchor is theta_pre, plus (keep_tail) the components beyond top_k of the first SVD."""
    theta = {n: merged[n].clone() for n in LAYERS}
    anchor = {}
    for n in LAYERS:
        *_, tail = ref_svd(merged[n] - pre[n], top_k)
        anchor[n] = pre[n] + tail if keep_tail else pre[n].clone()
    lambdas, losses = [], []
    for _ in range(iterations):
        spectra = {n: ref_svd(theta[n] - anchor[n], top_k)[:3] for n in LAYERS}
        lam = {
            n: torch.ones(1 if scalar else len(spectra[n][1]), dtype=DT) for n in LAYERS
        }
        opt = RefAdam(lr, optimizer)
        epoch_losses = []
        for _epoch in range(epochs):
            total = 0.0
            for x, y in batches:
                leaves = {n: lam[n].clone().requires_grad_(True) for n in LAYERS}
                w = dict(merged)
                for n, (u, s, vh) in spectra.items():
                    w[n] = anchor[n] + (u * (leaves[n] * s)) @ vh
                value = ref_loss(ref_forward(w, x), y, loss)
                grads = torch.autograd.grad(value, [leaves[n] for n in LAYERS])
                opt.step(lam, dict(zip(LAYERS, grads)))
                total += float(value.detach())
            epoch_losses.append(total / len(batches))
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

    res = rt.rethink(
        model,
        pre,
        batches,
        loss_fn,
        layers=list(LAYERS),
        compute_dtype=DT,
        shuffle=False,
        progress=False,
        **kwargs,
    )
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

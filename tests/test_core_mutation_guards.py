"""Boundary cases of the core maths that mutation testing (``mutmut run``) showed unguarded: exact
ties of Algorithm 1's budget and floor, rank-1 layers, the paper's default gamma, the uniform
baseline's budget flag, and input checks. Expectations come from the paper's definitions, written
out here."""

from __future__ import annotations

import math

import pytest
import torch
from test_core_rank_allocation import literal_algorithm_1

from pave_plugins.core.rank_allocation import (
    allocate_ranks,
    check_rho_gamma,
    default_gamma,
    spectral_rank_allocation,
)


@pytest.mark.parametrize("rho", [7 / 8, 15 / 16, 31 / 32, 63 / 64, 0.5])
def test_default_gamma_is_the_papers(rho):
    """Appendix A.1: gamma = rho - (1 - rho) / 2, used whenever gamma is not given."""
    assert default_gamma(rho) == pytest.approx(rho - (1 - rho) / 2, abs=1e-15)
    assert check_rho_gamma(rho, None) == pytest.approx(rho - (1 - rho) / 2, abs=1e-15)
    g = torch.Generator().manual_seed(int(rho * 64))
    svals = [
        torch.sort(
            torch.rand(16, generator=g, dtype=torch.float64), descending=True
        ).values
        for _ in range(3)
    ]
    # a steep spectrum: its model is drained to the floor, so gamma decides its rank
    svals[0] = torch.logspace(0, -8, 16, dtype=torch.float64)
    lists = [s.tolist() for s in svals]
    assert spectral_rank_allocation(svals, rho) == literal_algorithm_1(
        lists, rho, rho - (1 - rho) / 2
    )


def steep_and_flat(full: int) -> list[torch.Tensor]:
    return [
        torch.logspace(0, -6, full, dtype=torch.float64),
        torch.linspace(1.0, 0.9, full, dtype=torch.float64),
    ]


def test_floor_reached_exactly_stops_the_model():
    """gamma R = 4 exactly: the steep model leaves the index set at r = 4 (line 10: r_i <= gamma R),
    and the flat one gives up the rest of the budget (16 -> 10)."""
    svals = steep_and_flat(8)
    ranks = spectral_rank_allocation(svals, 0.625, 0.5)
    assert (
        ranks == literal_algorithm_1([s.tolist() for s in svals], 0.625, 0.5) == [4, 6]
    )


def test_budget_reached_exactly_is_met():
    """rho K R = 12 exactly: stop at sum 12 (line 7 is a strict >), and report the budget as met."""
    svals = steep_and_flat(8)
    alloc = allocate_ranks({"l": svals}, 0.75, 0.25)
    assert sum(alloc.ranks["l"]) == 12 and alloc.budget_met["l"] is True
    assert alloc.ranks["l"] == literal_algorithm_1(
        [s.tolist() for s in svals], 0.75, 0.25
    )


def test_rank_one_layers_keep_rank_one():
    """R = 1: nothing can be removed (rank 0 would zero the purified weight); the budget is not met."""
    svals = [
        torch.tensor([2.0], dtype=torch.float64),
        torch.tensor([0.5], dtype=torch.float64),
    ]
    assert spectral_rank_allocation(svals, 0.5) == [1, 1]
    alloc = allocate_ranks({"bias_like": svals}, 0.5)
    assert alloc.ranks["bias_like"] == [1, 1] and alloc.budget_met["bias_like"] is False
    assert alloc.full_ranks == {"bias_like": 1} and alloc.model_ratios == [1.0, 1.0]


def test_single_model_allocation():
    """K = 1: the model's own spectrum against its own budget."""
    s = torch.logspace(0, -3, 10, dtype=torch.float64)
    alloc = allocate_ranks({"l": [s]}, 0.7)
    assert (
        alloc.ranks["l"] == literal_algorithm_1([s.tolist()], 0.7, 0.7 - 0.3 / 2) == [7]
    )
    assert alloc.full_ranks == {"l": 10} and alloc.budget_met == {"l": True}


def test_uniform_budget_flag():
    """Uniform baseline: floor(rho R) each; met when the sum fits rho K R, including exactly, and
    not when the rank-1 floor overshoots it (3 x 1 > 0.4 x 3 x 2 = 2.4)."""
    s8 = [torch.linspace(1, 0.1, 8, dtype=torch.float64)] * 2
    exact = allocate_ranks({"l": s8}, 0.5, method="uniform")
    assert exact.ranks["l"] == [4, 4] and exact.budget_met["l"] is True
    s2 = [torch.tensor([1.0, 0.5], dtype=torch.float64)] * 3
    over = allocate_ranks({"l": s2}, 0.4, method="uniform")
    assert over.ranks["l"] == [1, 1, 1] and over.budget_met["l"] is False
    assert over.model_ratios == [0.5, 0.5, 0.5]


def test_zero_spectrum_is_drained_first():
    """A model whose task matrix is zero has nothing to lose: its normalised values are 0, so it is
    decremented first, down to its floor (the paper's s_ij = sigma_ij / sigma_max is 0/0 there)."""
    svals = [
        torch.zeros(8, dtype=torch.float64),
        torch.linspace(1.0, 0.5, 8, dtype=torch.float64),
    ]
    ranks = spectral_rank_allocation(svals, 0.75, 0.5)
    assert ranks == [4, 8]
    assert all(math.isfinite(r) for r in ranks)


@pytest.mark.parametrize(
    ("svals", "message"),
    [
        ([torch.tensor([3.0, 1.0, 2.0])], "descending"),
        ([torch.tensor([3.0, 2.0, 2.5, 1.0])], "descending"),
        ([torch.tensor([3.0, -1.0])], "non-negative"),
        ([torch.tensor([3.0, float("nan")])], "finite"),
        ([torch.tensor([])], "zero singular values"),
        ([torch.ones(3), torch.ones(4)], "same full rank"),
        ([], "at least one model"),
    ],
)
def test_malformed_spectra_are_refused(svals, message):
    with pytest.raises(ValueError, match=message):
        spectral_rank_allocation(svals, 0.5)


@pytest.mark.parametrize(
    ("rho", "gamma", "message"),
    [
        ("0.9", None, "rho must be a number"),
        (True, None, "rho must be a number"),
        (float("nan"), None, "rho must be a number"),
        (0.0, None, r"must be in \(0, 1\]"),
        (1.5, None, r"must be in \(0, 1\]"),
        (0.9, "0.5", "gamma must be a number"),
        (0.9, True, "gamma must be a number"),
        (0.9, float("inf"), "gamma must be a number"),
        (0.9, 0.9, "the budget could never be met"),
    ],
)
def test_bad_rho_gamma(rho, gamma, message):
    with pytest.raises(ValueError, match=message):
        check_rho_gamma(rho, gamma)

"""Algorithm 1 against a literal transcription of the paper's loop and exhaustive search of eq. 9."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pave_plugins.core.rank_allocation import (
    allocate_ranks,
    check_rho_gamma,
    default_gamma,
    spectral_rank_allocation,
    uniform_rank_allocation,
)
from independent_reference import literal_algorithm_1




def random_spectra(K, R, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(K):
        v = torch.rand(R, generator=g, dtype=torch.float64) * 10
        if ties:
            v = torch.round(v)  # many equal values
        out.append(torch.sort(v, descending=True).values + 1e-3 * ties)
    return out


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("rho", [7 / 8, 15 / 16, 0.6, 0.3])
def test_matches_literal_transcription(seed, rho):
    K = 1 + seed % 4
    R = 5 + 3 * seed
    svals = random_spectra(K, R, seed, ties=seed % 3 == 0)
    gamma = default_gamma(rho)
    ours = spectral_rank_allocation(svals, rho)
    assert ours == literal_algorithm_1([s.tolist() for s in svals], rho, gamma)


def eq9_objective(svals, ranks):
    return sum(float(((s[r:] / s[0]) ** 2).sum()) for s, r in zip(svals, ranks))


@pytest.mark.parametrize("seed", range(8))
def test_greedy_is_optimal_for_eq9_by_exhaustive_search(seed):
    K, R = 3, 6
    rho = [0.5, 0.6, 0.75, 0.9][seed % 4]
    gamma = [None, 0.2][seed % 2]
    svals = random_spectra(K, R, 100 + seed)
    ours = spectral_rank_allocation(svals, rho, gamma)
    g = default_gamma(rho) if gamma is None else gamma
    floor = max(1, math.floor(g * R))  # the rank at which a model leaves the index set
    best = None
    for ranks in itertools.product(range(floor, R + 1), repeat=K):
        if sum(ranks) <= rho * K * R:
            val = eq9_objective(svals, ranks)
            best = val if best is None else min(best, val)
    assert best is not None
    assert sum(ours) <= rho * K * R
    assert eq9_objective(svals, ours) == pytest.approx(best, rel=1e-12, abs=1e-15)


def test_edge_cases():
    s = [torch.tensor([4.0, 3.0, 2.0, 1.0])]
    # K = 1: plain truncation to the budget
    assert spectral_rank_allocation(s, 0.75) == [3]
    # rho = 1 keeps everything
    assert spectral_rank_allocation(s * 3, 1.0) == [4, 4, 4]
    # ties: equal normalised values, the lowest model index is decremented first
    tied = [torch.tensor([2.0, 1.0]), torch.tensor([4.0, 2.0])]
    assert spectral_rank_allocation(tied, 0.75, gamma=0.0) == [1, 2]
    # the model with the faster-decaying spectrum gives up more rank
    fast = torch.tensor([10.0, 1.0, 0.1, 0.01, 0.001, 0.0001, 1e-5, 1e-6])
    slow = torch.tensor([10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0])
    r = spectral_rank_allocation([fast, slow], 0.75, gamma=0.0)
    assert r[0] < r[1] and sum(r) == 12
    # budget unreachable: every model stops at rank 1
    alloc = allocate_ranks({"tiny": [torch.tensor([1.0, 0.5])] * 2}, 0.25, 0.0)
    assert alloc.ranks["tiny"] == [1, 1] and alloc.budget_met["tiny"] is False
    # zero singular values (rank-deficient layer) are handled
    z = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([2.0, 1.0, 0.0])]
    assert sum(spectral_rank_allocation(z, 0.5, 0.0)) == 3


def test_whole_model_ratios_and_uniform_baseline():
    layers = {
        "a": random_spectra(3, 8, 1),
        "b": random_spectra(3, 16, 2),
    }
    alloc = allocate_ranks(layers, 7 / 8)
    for name, svals in layers.items():
        assert alloc.ranks[name] == spectral_rank_allocation(svals, 7 / 8)
        assert alloc.full_ranks[name] == svals[0].numel()
        assert alloc.budget_met[name]
    for i in range(3):  # Algorithm 1 line 15
        expected = (alloc.ranks["a"][i] + alloc.ranks["b"][i]) / (8 + 16)
        assert alloc.model_ratios[i] == pytest.approx(expected)
    uni = allocate_ranks(layers, 7 / 8, method="uniform")
    assert uni.ranks == {"a": [7, 7, 7], "b": [14, 14, 14]}
    assert uniform_rank_allocation(10, 2, 0.05) == [1, 1]
    assert to_json_roundtrip(alloc.to_dict())


def to_json_roundtrip(d):
    import json

    return json.loads(json.dumps(d)) == d


def test_validation():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        check_rho_gamma(0.0, None)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        spectral_rank_allocation([torch.ones(3)], 1.5)
    with pytest.raises(ValueError, match="smaller than rho"):
        spectral_rank_allocation([torch.ones(3)], 0.5, gamma=0.5)
    with pytest.raises(ValueError, match="descending"):
        spectral_rank_allocation([torch.tensor([1.0, 2.0])], 0.5)
    with pytest.raises(ValueError, match="same full rank"):
        spectral_rank_allocation([torch.ones(3), torch.ones(4)], 0.5)
    with pytest.raises(ValueError, match="at least one"):
        spectral_rank_allocation([], 0.5)
    with pytest.raises(ValueError, match="finite"):
        spectral_rank_allocation([torch.tensor([float("nan"), 1.0])], 0.5)
    with pytest.raises(ValueError, match="unknown rank allocation"):
        allocate_ranks({"a": [torch.ones(2)]}, 0.5, method="greedy")


def test_budget_with_round_off_removes_exactly_the_budget():
    # rho * K * R = 0.57 * 100 is 56.99999999999999 in floating point: the budget is 57 ranks
    import torch

    from pave_plugins.core import allocate_ranks

    g = torch.Generator().manual_seed(0)
    svals = [torch.rand(50, generator=g, dtype=torch.float64).sort(descending=True).values for _ in range(2)]
    alloc = allocate_ranks({"w": svals}, 0.57, gamma=0.1)
    assert sum(alloc.ranks["w"]) == 57 and alloc.budget_met["w"]
    # uniform: the rank-1 floor can exceed a tiny budget, and that is reported
    tiny = allocate_ranks({"w": [torch.ones(1, dtype=torch.float64)] * 3}, 0.5, method="uniform")
    assert tiny.ranks["w"] == [1, 1, 1] and not tiny.budget_met["w"]


# ------------------------------------------------------------------ the round-off allowance, at its edge
# rho K R and gamma R are compared with an allowance of 1e-9 for round-off (0.57 * 100 =
# 56.99999999999999 must mean 57): a product up to 1e-9 *below* an integer n counts as n, inclusive.
# With K R and R powers of two, rho = (n - 1e-9) / (K R) puts rho K R exactly 1e-9 below n (the
# scaling by a power of two is exact), the very edge of that allowance.
ALLOWANCE = 1e-9


def steep_flat(full):
    return [
        torch.logspace(0, -6, full, dtype=torch.float64),
        torch.linspace(1.0, 0.9, full, dtype=torch.float64),
    ]


def test_budget_a_hair_below_an_integer_counts_as_that_integer():
    """K R = 8, rho K R = 5 - 1e-9: the budget is 5 ranks (line 7 stops at sum 5), and it is met."""
    rho = (5 - ALLOWANCE) / 8
    svals = steep_flat(4)
    alloc = allocate_ranks({"l": svals}, rho, 0.0)
    # Algorithm 1 with the budget read as the integer 5 (literal transcription, rho = 5 / 8)
    assert alloc.ranks["l"] == literal_algorithm_1([s.tolist() for s in svals], 5 / 8, 0.0)
    assert sum(alloc.ranks["l"]) == 5 and alloc.budget_met["l"] is True
    assert spectral_rank_allocation(svals, rho, 0.0) == alloc.ranks["l"]


def test_uniform_budget_a_hair_below_an_integer_is_met():
    """Uniform, K = 1, R = 4, rho R = 3 - 1e-9: rank floor(3) = 3, and 3 <= rho K R counts as met."""
    rho = (3 - ALLOWANCE) / 4
    alloc = allocate_ranks({"l": [torch.linspace(1.0, 0.1, 4, dtype=torch.float64)]}, rho, method="uniform")
    assert alloc.ranks["l"] == [3] and alloc.budget_met["l"] is True


def test_floor_a_hair_below_an_integer_counts_as_that_integer():
    """R = 4, gamma R = 2 - 1e-9: the steep model leaves the index set at r = 2 (its floor), so the
    budget rho K R = 5 is taken from the flat model: [2, 3], as Algorithm 1 with gamma R = 2."""
    gamma = (2 - ALLOWANCE) / 4
    svals = steep_flat(4)
    ranks = spectral_rank_allocation(svals, 0.625, gamma)
    assert ranks == literal_algorithm_1([s.tolist() for s in svals], 0.625, 0.5) == [2, 3]


def test_floor_a_hair_below_full_rank_keeps_every_model_whole():
    """gamma R = R - 1e-9 counts as R: every model starts at its floor and never enters the index set
    (lines 10-11), so nothing is removed and the budget rho K R (just below K R) is not met."""
    full, k = 4, 2
    gamma = (full - ALLOWANCE) / full
    rho = 1 - 2e-10  # gamma < rho < 1, and rho K R + 1e-9 < K R: line 7 asks for one rank less
    alloc = allocate_ranks({"l": steep_flat(full)}, rho, gamma)
    assert alloc.ranks["l"] == [full] * k and alloc.budget_met["l"] is False


def test_to_dict_keys():
    """The report written next to merged models: the four fields under their own names."""
    layers = {"a": random_spectra(2, 6, 3)}
    alloc = allocate_ranks(layers, 0.75)
    assert alloc.to_dict() == {
        "ranks": alloc.ranks,
        "full_ranks": {"a": 6},
        "model_ratios": alloc.model_ratios,
        "budget_met": {"a": True},
    }


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: check_rho_gamma(0.9, 0.95),
         r"^gamma \(stopping ratio\) must be smaller than rho, got gamma=0.95 >= rho=0.9: the budget could never be met$"),
        (lambda: spectral_rank_allocation([], 0.5), r"^spectral rank allocation needs at least one model$"),
        (lambda: spectral_rank_allocation([torch.tensor([])], 0.5),
         r"^a layer with zero singular values cannot be ranked$"),
    ],
)
def test_messages_in_full(call, message):
    with pytest.raises(ValueError, match=message):
        call()

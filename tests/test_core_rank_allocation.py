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


def literal_algorithm_1(svals: list[list[float]], rho: float, gamma: float) -> list[int]:
    """Lines 4-13 of Algorithm 1, transcribed line by line (first index wins a tie)."""
    K, R = len(svals), len(svals[0])
    s = [[v / row[0] for v in row] for row in svals]  # line 4
    r = [R] * K  # line 5
    index_set = list(range(K))  # line 6
    while sum(r) / (K * R) > rho and index_set:  # line 7 (stops if the set empties)
        t = min(index_set, key=lambda i: (s[i][r[i] - 1], i))  # line 8 (s_{i, r_i}, 1-based)
        r[t] -= 1  # line 9
        if r[t] <= gamma * R or r[t] <= 1:  # lines 10-11 (+ rank >= 1)
            index_set.remove(t)
    return r


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

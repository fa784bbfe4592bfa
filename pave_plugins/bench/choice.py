"""Selection on validation: the best point of a hyper-parameter grid, and where to extend a grid
whose best point lies on its edge."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from .methods import Provider


@dataclass
class Choice:
    """The best point of a hyper-parameter grid on validation (mean accuracy over tasks)."""

    hp: dict[str, Any]
    val: dict[str, float]
    val_avg: float
    merge_s: float
    trace: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)  # PAVE statistics of the chosen rho
    provider: Provider | None = None
    recipe: dict[str, Any] | None = None

    def offer(self, other: "Choice") -> "Choice":
        """The better of the two (ties keep the first), carrying the trace of both."""
        trace = self.trace + other.trace
        best = other if other.val_avg > self.val_avg else self
        return dataclasses.replace(best, trace=trace)


NO_CHOICE = Choice(hp={}, val={}, val_avg=-1.0, merge_s=0.0)


def grid_extension(grid: Sequence[dict[str, Any]], best: dict[str, Any]) -> list[dict[str, Any]]:
    """Points past the edge of ``grid`` when ``best`` sits on it; ``[]`` when it is inside.

    Only the first hyper-parameter is extended (lambda, alpha, ratio; DARE's sparsity stays fixed
    at the chosen value): below the lowest value by half of it, above the highest by the grid's
    last step. Values stay positive; RegMean's ``ratio`` stays at most 1.
    """
    if len(grid) < 2 or not best:
        return []
    name = next(iter(best))
    same = [g for g in grid if all(g.get(k) == v for k, v in best.items() if k != name)]
    values = sorted({float(g[name]) for g in same})
    if len(values) < 2:
        return []
    v = float(best[name])
    if v == values[0]:
        new = values[0] / 2
    elif v == values[-1]:
        new = values[-1] + (values[-1] - values[-2])
        if name == "ratio":
            new = min(new, 1.0)
    else:
        return []
    if new in values or new <= 0:
        return []
    return [{**best, name: round(new, 6)}]

"""Per-problem routing of groups to model tiers by fitness percentiles (pure functions).

Tiers are model indices in cost order, 0 the most expensive. With B models there are B - 1
percentiles (ascending); each becomes a threshold over *this problem's* group fitness values.
Higher fitness means more confident. A group below the first threshold goes to model 0, one
at or above threshold j (and below j + 1) to model j, one at or above the last to the cheapest
model; then the ``lite_fraction`` most confident of the cheapest model's groups move to the
lite tier, which makes no call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence

LITE = -1


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default ``linear`` method)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside [0, 100]")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Routing:
    tiers: list[int]          # per group: model index (0 = most expensive) or LITE
    thresholds: list[float]   # one per model boundary

    def counts(self, n_models: int) -> dict[int, int]:
        out = dict.fromkeys(range(n_models), 0)
        out[LITE] = 0
        for t in self.tiers:
            out[t] += 1
        return out


def route(fitness: Sequence[float], n_models: int, percentiles: Sequence[float],
          lite_fraction: float = 0.0) -> Routing:
    """Route one problem's groups. ``percentiles`` has ``n_models - 1`` ascending entries."""
    if n_models < 1:
        raise ValueError("at least one model")
    if len(percentiles) != n_models - 1:
        raise ValueError(f"{n_models} models need {n_models - 1} percentiles, got {len(percentiles)}")
    if list(percentiles) != sorted(percentiles):
        raise ValueError("percentiles must be ascending")
    if not 0 <= lite_fraction <= 1:
        raise ValueError("lite_fraction must be within [0, 1]")
    if not fitness:
        return Routing([], [])
    thresholds = [percentile(fitness, q) for q in percentiles]
    # the number of thresholds a value reaches is how many tiers cheaper than model 0 it goes
    tiers = [sum(1 for t in thresholds if f >= t) for f in fitness]
    cheapest = n_models - 1
    in_cheapest = [g for g, t in enumerate(tiers) if t == cheapest]
    n_lite = math.floor(lite_fraction * len(in_cheapest) + 1e-9)
    # most confident first; equal fitness: the earlier group first, so the result is deterministic
    for g in sorted(in_cheapest, key=lambda g: (-fitness[g], g))[:n_lite]:
        tiers[g] = LITE
    return Routing(tiers, thresholds)


def default_percentiles(n_models: int) -> list[float]:
    """Evenly spaced boundaries: two models split at the median, three at 33.3 and 66.7, ..."""
    return [round(100 * j / n_models, 6) for j in range(1, n_models)]

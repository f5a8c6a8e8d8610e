"""Per-problem routing of groups to model tiers by fitness percentiles (pure functions).

Tiers are model indices in cost order, 0 the most expensive. With B models there are B - 1
percentiles; each becomes a threshold over *this problem's* group fitness values. Higher fitness
means more confident. The rules are those of the Squeeze-Evolve reference implementation
(``compute_thresholds`` and ``assign_routes`` in ``squeeze_evolve/algorithm/operators.py``,
whose ``model_0`` is the *cheapest* model, the reverse of our order):

- the percentiles are sorted first, so they may be given in any order;
- percentile 100 is the threshold ``max + 1`` (every group is below it: everything goes to the
  more expensive side), percentile 0 is ``min - 1`` (nothing is below it); any other is the
  linear-interpolation percentile (numpy's default);
- a group goes to model i, i the first threshold its fitness is *at or below*: a group exactly at
  a threshold goes to the more expensive tier, since a tie says nothing in favour of the cheap
  model; above every threshold, to the cheapest model;
- with ``lite_fraction`` > 0, the ``max(1, floor(lite_fraction * n))`` most confident of the n
  groups at the cheapest model move to the lite tier, which makes no call (ties: the lower group
  index first). The reference computes the floor as ``int(n * fraction)``; ours adds 1e-9 before
  flooring so that a product which binary floating point puts just below an integer
  (100 * 0.29 = 28.999999999999996) counts as that integer (29, where the reference takes 28).
  That is the one place the two differ, and only on such products.

Percentiles outside [0, 100] are refused (the reference treats them as 0 or 100): a value
there is a typo more likely than an intent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence

LITE = -1

# added before flooring lite_fraction * n (see the module docstring)
_FLOOR_SLACK = 1e-9


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


def thresholds(fitness: Sequence[float], percentiles: Sequence[float]) -> list[float]:
    """One threshold per percentile, ascending (the percentiles are sorted first). 100 and 0 lie
    outside the values (max + 1, min - 1), so that 100 sends every group to the expensive side
    and 0 none; an interpolated percentile at the maximum could not express "all"."""
    if not fitness:
        raise ValueError("thresholds of no fitness values")
    out = []
    for q in sorted(percentiles):
        if not 0 <= q <= 100:
            raise ValueError(f"percentile {q} outside [0, 100]")
        if q == 100:
            out.append(float(max(fitness)) + 1.0)
        elif q == 0:
            out.append(float(min(fitness)) - 1.0)
        else:
            out.append(percentile(fitness, q))
    return out


def lite_count(n: int, lite_fraction: float) -> int:
    """How many of the n groups at the cheapest model go to lite: none with a fraction of 0 or no
    such group, else at least one (the reference's ``max(1, int(n * fraction))``)."""
    if lite_fraction <= 0 or n == 0:
        return 0
    return min(n, max(1, math.floor(lite_fraction * n + _FLOOR_SLACK)))


@dataclass(frozen=True)
class Routing:
    tiers: list[int]          # per group: model index (0 = most expensive) or LITE
    thresholds: list[float]   # one per model boundary, ascending

    def counts(self, n_models: int) -> dict[int, int]:
        out = dict.fromkeys(range(n_models), 0)
        out[LITE] = 0
        for t in self.tiers:
            out[t] += 1
        return out


def route(fitness: Sequence[float], n_models: int, percentiles: Sequence[float],
          lite_fraction: float = 0.0) -> Routing:
    """Route one problem's groups. ``percentiles`` has ``n_models - 1`` entries in [0, 100], any order."""
    if n_models < 1:
        raise ValueError("at least one model")
    if len(percentiles) != n_models - 1:
        raise ValueError(f"{n_models} models need {n_models - 1} percentiles, got {len(percentiles)}")
    if any(not 0 <= q <= 100 for q in percentiles):
        raise ValueError("percentiles must be within [0, 100]")
    if not 0 <= lite_fraction <= 1:
        raise ValueError("lite_fraction must be within [0, 1]")
    if not fitness:
        return Routing([], [])
    bounds = thresholds(fitness, percentiles)
    cheapest = n_models - 1
    # the first threshold a value is at or below names its tier; above them all, the cheapest
    tiers = [next((i for i, t in enumerate(bounds) if f <= t), cheapest) for f in fitness]
    in_cheapest = [g for g, t in enumerate(tiers) if t == cheapest]
    # most confident first; equal fitness: the earlier group first, so the result is deterministic
    for g in sorted(in_cheapest, key=lambda g: (-fitness[g], g))[:lite_count(len(in_cheapest), lite_fraction)]:
        tiers[g] = LITE
    return Routing(tiers, bounds)


def default_percentiles(n_models: int) -> list[float]:
    """Evenly spaced boundaries: two models split at the median, three at 33.3 and 66.7, ..."""
    return [round(100 * j / n_models, 6) for j in range(1, n_models)]

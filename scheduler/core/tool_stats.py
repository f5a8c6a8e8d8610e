"""Per-tool duration histories, learned online.

A policy that decides at tool start whether keeping a program's KV is worth it
needs to know how long *this* tool usually takes, and, as the call runs on, how
much longer it is likely to take given how long it has already taken. For
heavy-tailed tools the expected remaining time *grows* with the time already
spent, which is exactly when keeping the KV stops paying.

Each tool keeps its last ``window`` durations (sorted). Until ``min_samples``
have been seen, an exponential prior with mean ``prior_mean_s`` stands in (as
Continuum does on cold start).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from itertools import accumulate


class ToolDurations:
    def __init__(self, window: int = 256, min_samples: int = 5, prior_mean_s: float = 5.0) -> None:
        self.window = window
        self.min_samples = min_samples
        self.prior_mean_s = prior_mean_s
        self._recent: deque[float] = deque()
        self._sorted: list[float] = []
        self._envelopes: dict[int, tuple[list[float], list[float], list[int]]] = {}  # by price; cleared on record

    def record(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self._envelopes.clear()
        self._recent.append(seconds)
        bisect.insort(self._sorted, seconds)
        if len(self._recent) > self.window:
            old = self._recent.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]

    @property
    def samples(self) -> int:
        return len(self._sorted)

    @property
    def learned(self) -> bool:
        return len(self._sorted) >= self.min_samples

    def mean(self) -> float:
        return sum(self._sorted) / len(self._sorted) if self.learned else self.prior_mean_s

    def quantile(self, q: float) -> float:
        if not self.learned:
            return -self.prior_mean_s * math.log(max(1e-12, 1 - q))
        i = min(len(self._sorted) - 1, max(0, math.ceil(q * len(self._sorted)) - 1))
        return self._sorted[i]

    def cdf(self, t: float) -> float:
        """P(duration <= t)."""
        if not self.learned:
            return 1 - math.exp(-max(0.0, t) / self.prior_mean_s)
        return bisect.bisect_right(self._sorted, t) / len(self._sorted)

    def expected_remaining(self, elapsed: float) -> float:
        """E[T - elapsed | T > elapsed]. Past every sample seen, the tail is assumed
        exponential with the mean of the top decile (a tool that overran its history is
        presumed to be in its tail, not about to finish)."""
        if not self.learned:
            return self.prior_mean_s  # memoryless prior
        i = bisect.bisect_right(self._sorted, elapsed)
        n = len(self._sorted) - i
        if n == 0:
            top = self._sorted[-max(1, len(self._sorted) // 10):]
            return max(sum(top) / len(top), 1e-3)
        # a C-level sum of at most `window` floats: cheaper than keeping suffix sums, which had
        # to be rebuilt in Python after every recorded duration (a tool ends before the next starts)
        return sum(self._sorted[i:]) / n - elapsed

    def keep_horizon(self, elapsed: float, recompute_s: float) -> float | None:
        """How much longer keeping a program's KV through this tool call pays (``None``: it does
        not; release now), when holding it costs one unit a second and releasing it costs
        ``recompute_s`` units (its recompute, priced by the caller). It pays if keeping it until
        *some* later time T, then releasing it if the tool has not returned, has a lower
        expected cost than releasing now: the threshold rule of ski rental, over this tool's own
        duration history; the horizon is the best such T, less ``elapsed``.

        Why not compare the expected remaining time with ``recompute_s`` (keep to the end, or
        not at all): on a heavy-tailed tool the mean is the tail's, so that rule released at
        the start calls that mostly return in a few seconds, and their contexts were recomputed.
        With h(T) = E[min(D, T)] + recompute_s * P(D > T), keeping until T costs h(T) - h(t)
        more than stopping at t, given D > t (scaled by P(D > t)); so keep iff some T > t has
        h(T) < h(t). Keeping to the end is one such T, so this keeps wherever the mean rule
        kept, and more. Past every sample seen, and before any (the memoryless prior), the two
        rules agree, the mean rule decides and the horizon is the expected remaining time."""
        if not self.learned or elapsed >= self._sorted[-1]:
            remaining = self.expected_remaining(elapsed)
            return remaining if remaining < recompute_s else None
        d = self._sorted
        n = len(d)
        j = bisect.bisect_right(d, elapsed)
        bucket = round(20 * math.log(max(recompute_s, 1e-6)))  # 5 % steps of the price
        k = math.exp(bucket / 20)
        envelope = self._envelopes.get(bucket)
        if envelope is None:
            envelope = self._envelopes[bucket] = self._envelope(k)
        prefix, later_min, later_arg = envelope
        h_now = (prefix[j] + (n - j) * elapsed) / n + k * (n - j) / n
        return d[later_arg[j]] - elapsed if later_min[j] < h_now * (1 - 1e-9) else None

    def _envelope(self, k: float) -> tuple[list[float], list[float], list[int]]:
        """Prefix sums of the sorted durations, and for each j the least h(T) over the sampled
        T = d[j'], j' >= j, and that j' (h as in ``keep_horizon``, recompute cost ``k``)."""
        d = self._sorted
        n = len(d)
        prefix = [0.0, *accumulate(d)]
        h = [0.0] * n
        for i, t in enumerate(d):
            longer = n - bisect.bisect_right(d, t, i)  # P(D > t) * n, ties counted as not longer
            h[i] = (prefix[n - longer] + longer * t) / n + k * longer / n
        later_min, later_arg = h[:], list(range(n))
        for i in range(n - 2, -1, -1):
            if later_min[i + 1] < later_min[i]:
                later_min[i], later_arg[i] = later_min[i + 1], later_arg[i + 1]
        return prefix, later_min, later_arg


class ToolStats:
    """``ToolDurations`` per tool name, created on first use."""

    def __init__(self, **kwargs: float) -> None:
        self._kwargs = kwargs
        self._tools: dict[str, ToolDurations] = {}

    def __getitem__(self, tool: str) -> ToolDurations:
        d = self._tools.get(tool)
        if d is None:
            d = self._tools[tool] = ToolDurations(**self._kwargs)  # type: ignore[arg-type]
        return d

    def record(self, tool: str, seconds: float) -> None:
        self[tool].record(seconds)

    def names(self) -> list[str]:
        return sorted(self._tools)

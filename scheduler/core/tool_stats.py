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


class ToolDurations:
    def __init__(self, window: int = 256, min_samples: int = 5, prior_mean_s: float = 5.0) -> None:
        self.window = window
        self.min_samples = min_samples
        self.prior_mean_s = prior_mean_s
        self._recent: deque[float] = deque()
        self._sorted: list[float] = []

    def record(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
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

"""Clocks the simulated engine runs on: virtual (a heap of events) or real (asyncio, scaled).

The engine only calls ``now()`` and ``call_at()``, so the same engine code runs a cluster-hour
in seconds under ``VirtualClock`` and serves HTTP in real time under ``RealTimeClock``.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float: ...

    def call_at(self, when: float, fn: Callable[[], None]) -> Timer: ...


class _Event:
    __slots__ = ("fn", "cancelled")

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class VirtualClock:
    """Deterministic discrete-event loop: events run in (time, insertion order)."""

    def __init__(self) -> None:
        self._now = 0.0
        self._heap: list[tuple[float, int, _Event]] = []
        self._seq = 0
        self.events_run = 0

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, fn: Callable[[], None]) -> _Event:
        event = _Event(fn)
        self._seq += 1
        heapq.heappush(self._heap, (max(when, self._now), self._seq, event))
        return event

    def run(self, until: float | None = None) -> None:
        """Run events up to ``until`` (inclusive; all of them when None), then stop there."""
        heap = self._heap
        while heap and (until is None or heap[0][0] <= until):
            when, _, event = heapq.heappop(heap)
            if event.cancelled:
                continue
            self._now = when
            self.events_run += 1
            event.fn()
        if until is not None:
            self._now = max(self._now, until)


class RealTimeClock:
    """Simulated seconds = wall seconds x ``speed``, on the running asyncio loop."""

    def __init__(self, speed: float = 1.0, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if speed <= 0:
            raise ValueError("speed must be > 0")
        self.speed = speed
        self._loop = loop or asyncio.get_running_loop()
        self._t0 = self._loop.time()

    def now(self) -> float:
        return (self._loop.time() - self._t0) * self.speed

    def call_at(self, when: float, fn: Callable[[], None]) -> asyncio.TimerHandle:
        return self._loop.call_at(self._t0 + when / self.speed, fn)

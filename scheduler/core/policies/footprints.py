"""Incremental indexes for a capacity policy: footprints per backend and the waiting queue by need.

With a thousand live programs, recomputing a backend's footprint (a pass over its resident
programs) or scanning the waiting queue on every event made the ``program`` policy's call
decisions miss 1 ms at p99. Both are kept in step instead from the programs the scheduler
marks as touched (``Scheduler.touch``): each event changes one or two programs, so a decision
costs O(changed · log W), not O(programs).

A program's share of its backend is its cost less the shared prefix, plus that prefix counted
once per backend (the largest ``prefix_tokens`` among the programs that count, as the radix
cache stores it once). Beside it, each backend's ``busy`` sum (what the policy says a program
contributes to it; ``program``: the contexts a prefill would stall) is kept in step the same way.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections import Counter, defaultdict
from dataclasses import dataclass
from collections.abc import Callable
from typing import TYPE_CHECKING

from scheduler.core.state import Program, Status

if TYPE_CHECKING:
    from scheduler.core.scheduler import Scheduler


@dataclass(frozen=True, slots=True)
class _Share:
    backend: str
    busy: float               # ``FootprintIndex.busy``'s part
    own: float                # its cost less the shared prefix
    shared_key: str | None    # its prefix, counted once on the backend (only when it costs anything)
    prefix_tokens: int
    key: str | None           # its prefix, present on the backend (for the need of others)


class FootprintIndex:
    def __init__(self, sched: Scheduler, cost: Callable[[Program], float],
                 least_need: Callable[[Program], float], busy: Callable[[Program], float]) -> None:
        self.s = sched
        self.cost = cost
        self.least_need = least_need
        self.busy_of = busy
        sched.touched_programs = set()
        self._share: dict[str, _Share] = {}
        self._own: dict[str, float] = defaultdict(float)
        self._busy: dict[str, float] = defaultdict(float)
        self._shared: dict[str, dict[str, Counter[int]]] = defaultdict(lambda: defaultdict(Counter))
        self._present: dict[str, Counter[str]] = defaultdict(Counter)
        self._by_need: list[tuple[float, str]] = []   # waiting programs with a request, by least need
        self._need_of: dict[str, tuple[float, str]] = {}

    # ---- queries --------------------------------------------------------------------------

    def footprint(self, backend: str) -> float:
        self.sync()
        shared = sum(max(c) for c in self._shared[backend].values() if c)
        return self._own[backend] + shared

    def busy(self, backend: str) -> float:
        """The sum of ``busy`` over the backend's resident programs."""
        self.sync()
        return self._busy[backend]

    def prefix_present(self, backend: str, key: str, besides: Program | None = None) -> bool:
        """Is a resident program (other than ``besides``) holding prefix ``key`` on ``backend``?"""
        self.sync()
        n = self._present[backend][key]
        mine = self._share.get(besides.id) if besides is not None else None
        if mine is not None and mine.backend == backend and mine.key == key:
            n -= 1
        return n > 0

    def prefixes(self, backend: str) -> set[str]:
        self.sync()
        return {k for k, n in self._present[backend].items() if n > 0}

    def waiting(self, at_most: float | None = None) -> list[Program]:
        """Waiting programs with a request, smallest need first; only those needing at most
        ``at_most`` when given."""
        self.sync()
        entries = self._by_need if at_most is None else self._by_need[:bisect_right(self._by_need, at_most, key=_need)]
        return [self.s.waiting[pid] for _, pid in entries]

    def smallest_need(self) -> float | None:
        self.sync()
        return self._by_need[0][0] if self._by_need else None

    # ---- keeping in step --------------------------------------------------------------------

    def sync(self) -> None:
        touched = self.s.touched_programs
        if not touched:
            return
        for pid in touched:
            self._unshare(pid)
            old = self._need_of.pop(pid, None)
            if old is not None:
                del self._by_need[bisect_left(self._by_need, old)]
            p = self.s.programs.get(pid)
            if p is None:
                continue
            if p.status is Status.ACTIVE and p.backend is not None and pid in self.s.resident[p.backend]:
                self._add_share(p)
            elif pid in self.s.waiting and p.pending:
                entry = (self.least_need(p), pid)
                insort(self._by_need, entry)
                self._need_of[pid] = entry
        touched.clear()

    def _add_share(self, p: Program) -> None:
        c = self.cost(p)
        counted = bool(c) and p.prefix_key is not None
        share = _Share(p.backend or "", self.busy_of(p),
                       c - min(p.prefix_tokens, c) if counted else c,
                       p.prefix_key if counted else None, p.prefix_tokens, p.prefix_key)
        self._share[p.id] = share
        self._own[share.backend] += share.own
        self._busy[share.backend] += share.busy
        if share.shared_key is not None:
            self._shared[share.backend][share.shared_key][share.prefix_tokens] += 1
        if share.key is not None:
            self._present[share.backend][share.key] += 1

    def _unshare(self, pid: str) -> None:
        share = self._share.pop(pid, None)
        if share is None:
            return
        self._own[share.backend] -= share.own
        self._busy[share.backend] -= share.busy
        if share.shared_key is not None:
            counts = self._shared[share.backend][share.shared_key]
            counts[share.prefix_tokens] -= 1
            if counts[share.prefix_tokens] <= 0:
                del counts[share.prefix_tokens]
        if share.key is not None:
            self._present[share.backend][share.key] -= 1


def _need(entry: tuple[float, str]) -> float:
    return entry[0]

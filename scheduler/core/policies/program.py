"""``program``: ours, the default.

Built on ThunderAgent's capacity-driven pause/resume, with these changes:

- **Admission per request, not per tick.** A request whose program's KV is not counted
  (new, paused, or released during its tool call) is admitted only if it fits; else it
  waits. Overload never reaches the engine as eviction, retraction and re-prefill.
- **Two watermarks.** Admission fills a backend up to ``admit_fraction`` of its KV;
  only growth past the capacity itself makes it pause programs, and then down to the
  admission mark, so contexts that grow a little do not trip pause/resume churn. It releases
  acting programs first, as few as will do (the smallest that frees the excess alone), then
  pauses reasoning ones, shortest first.
- **Keep or release at tool start, from learned tool durations.** Holding an acting
  program's c tokens costs c a second (memory denied to waiting programs); releasing them
  costs a recompute of prefill(c) when the tool returns, a stall of the M tokens of the other
  programs using its backend: those with a call running (InferCept's waste rule) and those
  kept through a tool (back within seconds). Keep-or-release is then ski
  rental over the tool's online duration history (``ToolDurations.keep_horizon``): keep while
  keeping until some later time, and releasing then if the tool has not returned, costs less
  in expectation than releasing now. Re-evaluated every second as the tool runs: a short
  call is kept to its end, a heavy-tailed call through its likely-short start and released
  in its tail. With nobody waiting, keeping is free and everything is kept.
  ``keep_rule="mean"`` is the earlier rule: keep while the tool's *expected* remaining time
  is under the price, M counting every token the backend holds. A heavy-tailed tool's mean is
  its tail's, so that rule released calls that mostly return in seconds and recomputed their
  contexts: the threshold rule gains 13-15 % steps/min on the heavy-tailed family and 0-3 %
  on ``stochastic``, ``memory`` and ``mix`` (seeds 100-102, docs/scheduler.md).
- **Decode headroom**: a reasoning program counts its context plus the output it is
  likely to add (twice its mean completion so far, at most its ``max_tokens``).
- **Shared prefixes counted once** per backend (one system prompt across programs).
- **Restore order**: programs waiting longer than ``starvation_s`` first, then the
  least-attained-service tenant, paused programs before new ones, smallest first
  (cheapest to rebuild, quickest to finish a step). ``aging_s`` is the operator's tail setting:
  the size in that order is divided by 1 + H / ``aging_s``, H the seconds the program's calls
  have waited for dispatch in all (``Program.held``), so a program held again and again (a long
  one, paused while others finished) comes forward. Smallest first leaves the largest, oldest
  programs for last, which is where the p95 completion time comes from; ``aging_s=600`` brought
  the p95 under the best ThunderAgent's on ``coding`` and ``stochastic`` at 96 programs for
  1-3 % of steps/min (docs/scheduler.md). Off by default. Affinity: a program resumes on the
  backend that holds its KV when it fits there, else by best fit; a new program goes to the
  least loaded backend (it grows where it is put), by best fit among equals.
- **Kept KV outlives released KV on the engine.** Keeping a program's KV is worth nothing
  if the engine's LRU evicts it for more recently used KV of programs we released. With
  SGLang's priority eviction (``--radix-eviction-policy priority``) every call is ranked by
  its dispatch time and a kept acting program by the end of its expected tool call
  (``Retain``: a one-token request over its context), once per tool call and only when
  programs wait for memory. The rank reaches the tool's expected return or the keep horizon,
  whichever is sooner: a rank is never lowered by later calls, so one that outlasts the call
  protects a context nobody needs (ranking to the keep horizon alone cost 7 % on ``coding``).
  The ranks lapse by themselves: later calls outrank them.
- **Sandboxes** of the next programs to be restored are prepared (at the tick) before they resume.
"""

from __future__ import annotations

import bisect
import heapq
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import ClassVar

from scheduler.core.policies.base import register
from scheduler.core.policies.capacity import CapacityPolicy
from scheduler.core.policies.footprints import FootprintIndex
from scheduler.core.state import BackendView, Phase, Program, Status


@register("program")
class ProgramPolicy(CapacityPolicy):
    check_interval_s = 1.0
    engine_flags: ClassVar[dict[str, object]] = {"radix_eviction_policy": "priority"}
    ranks_kv = True
    retain_max_s = 600.0  # the longest a kept program's KV is ranked ahead at once

    def __init__(self, check_interval_s: float | None = None, capacity_fraction: float = 1.0,
                 admit_fraction: float = 0.9, prepare_ahead: int = 4, starvation_s: float = 120.0,
                 keep_factor: float = 1.0, keep_rule: str = "threshold", aging_s: float | None = None) -> None:
        super().__init__(check_interval_s, capacity_fraction)
        self.admit_fraction = admit_fraction
        self.prepare_ahead = prepare_ahead
        self.starvation_s = starvation_s
        self.keep_factor = keep_factor
        if keep_rule not in ("mean", "threshold"):
            raise ValueError(f"keep_rule is 'mean' or 'threshold', not {keep_rule!r}")
        self.keep_rule = keep_rule
        if aging_s is not None and aging_s <= 0:
            raise ValueError(f"aging_s must be positive or None, not {aging_s!r}")
        self.aging_s = aging_s

    # ---- accounting -------------------------------------------------------------------

    def headroom(self, p: Program) -> float:
        if p.requests:
            return min(p.max_tokens, 2.0 * p.completion_tokens_total / p.requests)
        return min(p.max_tokens, 512)

    def weight(self, p: Program, now: float) -> float:
        return 1.0 if p.kept else 0.0

    def cost(self, p: Program, now: float) -> float:
        if p.phase is Phase.REASONING:
            return p.tokens + self.headroom(p)
        return float(p.tokens) if p.kept else 0.0

    def attach(self, sched: Scheduler) -> None:  # type: ignore[name-defined]  # noqa: F821
        super().attach(sched)
        self.index = FootprintIndex(sched, lambda p: self.cost(p, 0.0), self.least_need, self.busy)

    def least_need(self, p: Program) -> float:
        """The room ``p`` needs where its shared prefix is already present."""
        return p.tokens + self.headroom(p) - p.prefix_tokens

    def set_kept(self, p: Program, kept: bool) -> None:
        if p.kept != kept:
            p.kept = kept
            self.s.touch(p)

    def footprint(self, b: BackendView, now: float) -> float:
        """Kept in step as programs change (``FootprintIndex``): cost does not depend on time in
        this policy, so nothing else can change it."""
        return self.index.footprint(b.name)

    def need(self, p: Program, b: BackendView, prefixes: set[str] | None = None) -> float:
        """What admitting ``p`` on ``b`` adds; its shared prefix is free where already present."""
        own = p.tokens + self.headroom(p)
        if p.prefix_key is not None:
            present = (p.prefix_key in prefixes if prefixes is not None else
                       self.index.prefix_present(b.name, p.prefix_key, besides=p))
            if present:
                own -= p.prefix_tokens
        return own

    def admit_limit(self, b: BackendView) -> float:
        return b.capacity * self.admit_fraction

    def fits_alone(self, p: Program, b: BackendView) -> bool:
        return self.need(p, b, set()) <= self.admit_limit(b)

    def demand(self) -> bool:
        """Is any program waiting with a request to run?"""
        return self.index.smallest_need() is not None

    # ---- keep or release during a tool call ------------------------------------------------

    def worth_keeping(self, p: Program, now: float, *, demand: bool | None = None) -> bool:
        b = self.s.backends.get(p.backend or "")
        if b is None or p.tool is None:
            return False
        if not (self.demand() if demand is None else demand):
            return True  # nobody wants the memory
        return self.keep_horizon(p, b, now) is not None

    def keep_horizon(self, p: Program, b: BackendView, now: float) -> float | None:
        """How much longer keeping ``p``'s KV through its tool call pays (``None``: release it):
        holding its c tokens costs c a second; releasing them costs ``recompute_price``.
        ``threshold``: ``ToolDurations.keep_horizon``; ``mean``: the expected remaining time,
        if below the price."""
        assert p.tool is not None
        tool, elapsed = self.s.tools[p.tool], p.time_in_tool(now)
        price = self.recompute_price(p, b, now)
        if self.keep_rule == "threshold":
            return tool.keep_horizon(elapsed, price)
        remaining = tool.expected_remaining(elapsed)
        return remaining if remaining < price else None

    def recompute_price(self, p: Program, b: BackendView, now: float) -> float:
        """What recomputing ``p``'s context when its tool returns costs, in token-seconds:
        prefill(c) during which M tokens make no progress (``keep_factor`` scales it). For the
        threshold rule M is the context of the other programs using the engine (``busy``); the mean
        rule counted every token ``b`` holds, decode headroom included, which made the
        threshold rule keep too much under memory pressure (-4-7 % steps/min there, seeds 0-2)."""
        if self.keep_rule == "threshold":
            held = self.index.busy(b.name) - (self.busy(p) if p.id in self.s.resident[b.name] else 0.0)
        else:
            held = self.footprint(b, now)
        return self.keep_factor * b.prefill_s_per_token * max(held, p.tokens)

    @staticmethod
    def busy(p: Program) -> float:
        """The context of a program that uses its engine: one with a call running, or acting and
        kept (back within seconds, and then stalled by a prefill like the running ones). Counting
        only the running calls priced a recompute too low where tools are short: OpenHands-like
        rollouts lost 11 % (``bench/rollout.py``, 4x384)."""
        return float(p.tokens) if p.inflight or (p.phase is Phase.ACTING and p.kept) else 0.0

    def retain(self, p: Program, now: float) -> None:
        """Rank a kept acting program's KV to the end of its expected tool call, or to its keep
        horizon if sooner, so the engine evicts released programs' KV first. Once per tool call
        (at its start, or at the first tick that finds programs waiting for memory): renewing a
        rank that has lapsed would re-prefill whatever the engine evicted meanwhile (measured:
        more recompute and a worse p95 than letting it lapse)."""
        horizon = self.s.tools[p.tool].expected_remaining(p.time_in_tool(now)) if p.tool else 0.0
        b = self.s.backends.get(p.backend or "")
        if b is not None and p.tool and self.keep_rule == "threshold":
            keep = self.keep_horizon(p, b, now)
            if keep is not None:
                horizon = min(horizon, keep)
        self.s.retain(p, now + min(self.retain_max_s, max(horizon, 2 * self.check_interval_s)))

    def on_tool_start(self, p: Program, now: float) -> None:
        if p.status is Status.ACTIVE:
            p.retain_until = None
            demand = self.demand()
            self.set_kept(p, self.worth_keeping(p, now, demand=demand))
            if not p.kept:
                self.restore(now)
            elif demand:
                self.retain(p, now)

    def on_finished(self, p: Program, now: float) -> None:
        self.restore(now)  # its output is known now; headroom it reserved may be free

    # ---- admission ---------------------------------------------------------------------------

    def on_request(self, p: Program, new: bool, now: float) -> None:
        if p.status is Status.ACTIVE and p.backend is not None:
            if p.kept or p.inflight:
                self.set_kept(p, True)
                self.s.dispatch(p, p.backend)
                return
            # released during its tool call: admitted again only if it fits
            b = self.s.backends[p.backend]
            others = self.footprint(b, now) - self.cost(p, now)  # p already counts as reasoning
            if others + self.need(p, b) <= self.admit_limit(b):
                self.set_kept(p, True)
                self.s.dispatch(p, p.backend)
                return
            self.s.pause(p)
        self.restore(now)

    def after_release(self, now: float) -> None:
        self.restore(now)

    # ---- relieve and restore -----------------------------------------------------------------

    def on_tick(self, now: float) -> None:
        if now - self._last_check < self.check_interval_s:
            return
        self._last_check = now
        demand = self.demand()
        if demand:  # re-evaluate kept KV as tools run on
            for b in self.s.healthy_backends():
                for p in self.s.resident[b.name].values():
                    if p.phase is Phase.ACTING and p.kept:
                        kept = self.worth_keeping(p, now, demand=True)
                        self.set_kept(p, kept)
                        if kept and p.retain_until is None and b.ranks_kv:  # kept before anyone waited
                            self.retain(p, now)
        for b in self.s.healthy_backends():
            self.relieve(b, now)
        self.restore(now, tick=True)

    def relieve(self, b: BackendView, now: float) -> None:
        """Over capacity (contexts grew): bring the backend back under the *admission*
        watermark, so that growth does not trip it again at once. Stop keeping KV that is
        not worth keeping, then release acting programs, as few as will do (``_fewest``),
        then pause reasoning ones, shortest first. A paused reasoning program frees nothing
        until its call ends, and then waits to be restored, smallest first: a short one is
        back soon, often to KV the engine still holds; a long one would wait longest and be
        recomputed in full (pausing those as few as will do measured 5-6 % fewer steps/min on
        ``fast_tools`` 160, seeds 101 and 102)."""
        total = self.footprint(b, now)
        if total <= self.limit(b):
            return
        programs = list(self.s.resident[b.name].values())
        target = self.admit_limit(b)
        for p in programs:
            if p.phase is Phase.ACTING and p.kept and not self.worth_keeping(p, now):
                self.set_kept(p, False)
                total -= p.tokens
        acting = [p for p in programs if p.phase is Phase.ACTING]
        for p in _fewest(acting, lambda p: self.cost(p, now), total - target):
            total -= self.cost(p, now)
            self.s.pause(p)
        for p in sorted((p for p in programs if p.phase is Phase.REASONING), key=lambda p: p.tokens):
            if total <= target:
                return
            total -= self.cost(p, now)
            self.s.pause(p)

    def restore(self, now: float, tick: bool = False) -> None:
        smallest = self.index.smallest_need()
        if smallest is None:
            return  # nobody waits with a request (acting programs wait for their tool)
        backends = {b.name: b for b in self.s.healthy_backends()}
        room = {name: self.admit_limit(b) - self.footprint(b, now) for name, b in backends.items()}
        widest = max(room.values(), default=0.0)
        if tick:
            queue = self.index.waiting()
        else:
            # Between ticks only admission happens (sandboxes are prepared at the tick): order
            # only the programs that could fit somewhere. Rooms only shrink as programs are
            # admitted, so the others would be skipped anyway; the admissions are the same as
            # ordering the whole queue, at a fraction of the cost with hundreds waiting.
            if widest < smallest:
                return  # nothing fits anywhere
            queue = self.index.waiting(at_most=widest)
        tenants = {p.tenant for p in queue}
        tenant_service: dict[str, float] = defaultdict(float)
        if len(tenants) > 1:
            for q in self.s.programs.values():
                tenant_service[q.tenant] += q.attained

        def key(p: Program) -> tuple[float, ...]:
            waited = now - (p.paused_at if p.paused_at is not None else p.created)
            size = p.tokens if self.aging_s is None else p.tokens / (1.0 + p.held(now) / self.aging_s)
            return (0 if waited > self.starvation_s else 1, tenant_service[p.tenant],
                    0 if p.status is Status.PAUSED else 1, size)

        prefixes = {name: self.index.prefixes(name) for name in backends}
        prepared = 0
        for p in _in_order(queue, key):
            if max(room.values(), default=0.0) < smallest:  # nothing more fits anywhere
                if prepared >= self.prepare_ahead or not tick:
                    break
                self.s.prepare_sandbox(p)  # the next to run get their sandboxes ready
                prepared += 1
                continue
            target = None
            if (p.backend in backends and (p.allowed is None or p.backend in p.allowed)
                    and room[p.backend] >= self.need(p, backends[p.backend], prefixes[p.backend])):
                target = p.backend  # affinity: its KV may still be there
            else:
                fits = [(room[n] - self.need(p, b, prefixes[n]), n) for n, b in backends.items()
                        if (p.allowed is None or n in p.allowed) and room[n] >= self.need(p, b, prefixes[n])]
                if fits and p.backend is None:
                    # new: the least loaded backend (fewest tokens counted), best fit among equals.
                    # A new program starts small and grows where it is put (its calls stick to
                    # that backend), so packing new programs by best fit put a whole first wave
                    # on one engine of four while the others stood empty (48 programs on engine 0
                    # at 5 s), and they then paused each other as their contexts grew
                    target = min((self.admit_limit(backends[n]) - room[n], left, n) for left, n in fits)[2]
                elif fits:
                    target = min(fits)[1]  # best fit for a program that moves: big holes for big ones
            if target is None:
                if tick and prepared < self.prepare_ahead:
                    self.s.prepare_sandbox(p)
                    prepared += 1
                continue
            room[target] -= self.need(p, backends[target], prefixes[target])
            if p.prefix_key is not None:
                prefixes[target].add(p.prefix_key)
            self.set_kept(p, True)
            self.admit(p, target)


def _fewest(candidates: list[Program], size: Callable[[Program], float], excess: float) -> list[Program]:
    """Which acting programs (of ``candidates``) to release to free ``excess``:
    the smallest one that frees it alone, else the largest, and again for the rest. Each release
    costs a recompute of about the same per token freed, whichever program frees it, and one
    more program that must wait for memory when its tool returns; so free the excess with as
    few as will do. Releasing the shortest first, as before 2026-12-05, released several small
    programs where one would do: more pauses and 2-4 % fewer steps/min on ``coding`` and
    ``stochastic`` (tuning seeds 0-2; docs/scheduler.md)."""
    left = sorted((p for p in candidates if size(p) > 0), key=size)  # pausing what holds nothing frees nothing
    sizes = [size(p) for p in left]
    chosen = []
    while left and excess > 0:
        i = min(bisect.bisect_left(sizes, excess), len(left) - 1)
        chosen.append(left.pop(i))
        excess -= sizes.pop(i)
    return chosen


def _in_order(queue: list[Program], key: Callable[[Program], tuple[float, ...]]) -> Iterator[Program]:
    """``sorted(queue, key=key)``, lazily: a restore usually takes only the first few, so a
    heap (O(W) to build, O(log W) a program) beats sorting all W waiting programs."""
    heap = [(key(p), i, p) for i, p in enumerate(queue)]
    heapq.heapify(heap)
    while heap:
        yield heapq.heappop(heap)[2]

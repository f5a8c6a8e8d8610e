"""``program``: ours, the default.

Built on ThunderAgent's capacity-driven pause/resume, with these changes:

- **Admission per request, not per tick.** A request whose program's KV is not counted
  (new, paused, or released during its tool call) is admitted only if it fits; else it
  waits. Overload never reaches the engine as retraction and re-prefill storms.
- **Keep or release at tool start, from learned tool durations.** An acting program's KV
  is kept (counted) while keeping costs less than recomputing: c·R(t) < prefill(c)·M,
  with R(t) the tool's expected remaining time given the time already spent (from its
  online duration history) and M the tokens of the backend's running programs that a
  recompute stalls (InferCept's waste rule). Re-evaluated as the tool runs: a
  heavy-tailed call is released once it is in its tail, a short stable one is kept.
  With nobody waiting, keeping is free and everything is kept.
- **Decode headroom**: a reasoning program counts its context plus the output it is
  likely to add (twice its mean completion so far, at most its ``max_tokens``).
- **Shared prefixes counted once** per backend (one system prompt across programs).
- **Restore order**: least-attained-service tenant first, then reasoning programs, new
  programs, acting ones; first come first served within (completion time, not packing,
  is what users see), with backfill of smaller programs when the head does not fit.
- **Affinity**: a program resumes on the backend that holds its KV when it fits there.
- **Sandboxes** of the next programs to be restored are prepared before they resume.
"""

from __future__ import annotations

from collections import defaultdict

from scheduler.core.policies.base import register
from scheduler.core.policies.capacity import CapacityPolicy
from scheduler.core.state import BackendView, Phase, Program, Status


@register("program")
class ProgramPolicy(CapacityPolicy):
    check_interval_s = 1.0

    def __init__(self, check_interval_s: float | None = None, capacity_fraction: float = 0.95,
                 prepare_ahead: int = 4) -> None:
        super().__init__(check_interval_s, capacity_fraction)
        self.prepare_ahead = prepare_ahead

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

    def footprint(self, b: BackendView, now: float) -> float:
        total = 0.0
        shared: dict[str, int] = defaultdict(int)
        for p in self.resident(b):
            c = self.cost(p, now)
            if c and p.prefix_key is not None:
                shared[p.prefix_key] = max(shared[p.prefix_key], p.prefix_tokens)
                c -= min(p.prefix_tokens, c)
            total += c
        return total + sum(shared.values())

    def need(self, p: Program, b: BackendView) -> float:
        own = p.tokens + self.headroom(p)
        if p.prefix_key is not None and any(q.prefix_key == p.prefix_key for q in self.resident(b) if q is not p):
            own -= p.prefix_tokens  # the shared prefix is already there
        return own

    def demand(self) -> bool:
        """Is any program waiting with a request to run?"""
        return any(p.pending for p in self.waiting())

    # ---- keep or release during a tool call ------------------------------------------------

    def worth_keeping(self, p: Program, now: float) -> bool:
        b = self.s.backends.get(p.backend or "")
        if b is None or p.tool is None:
            return False
        if not self.demand():
            return True  # nobody wants the memory
        remaining = self.s.tools[p.tool].expected_remaining(p.time_in_tool(now))
        running = sum(q.tokens for q in self.resident(b) if q.phase is Phase.REASONING)
        recompute_s = b.prefill_s_per_token * p.tokens
        return p.tokens * remaining < recompute_s * max(running, p.tokens)

    def on_tool_start(self, p: Program, now: float) -> None:
        if p.status is Status.ACTIVE:
            p.kept = self.worth_keeping(p, now)
            if not p.kept:
                self.restore(now)

    def on_tool_end(self, p: Program, now: float) -> None:
        pass  # the next request decides (on_request)

    def on_finished(self, p: Program, now: float) -> None:
        self.restore(now)  # its output is known now; headroom it reserved may be free

    # ---- admission ---------------------------------------------------------------------------

    def on_request(self, p: Program, new: bool, now: float) -> None:
        if p.status is Status.ACTIVE and p.backend is not None:
            if p.kept or p.inflight:
                p.kept = True
                self.s.dispatch(p, p.backend)
                return
            # released during its tool call: admitted again only if it fits
            b = self.s.backends[p.backend]
            others = self.footprint(b, now) - self.cost(p, now)  # p already counts as reasoning
            if others + self.need(p, b) <= self.limit(b):
                p.kept = True
                self.s.dispatch(p, p.backend)
                return
            self.s.pause(p)
        self.restore(now)

    # ---- relieve and restore -----------------------------------------------------------------

    def on_tick(self, now: float) -> None:
        if now - self._last_check < self.check_interval_s:
            return
        self._last_check = now
        waiting = self.demand()
        for p in self.s.programs.values():  # re-evaluate kept KV as tools run on
            if p.status is Status.ACTIVE and p.phase is Phase.ACTING and p.kept and waiting:
                p.kept = self.worth_keeping(p, now)
        for b in self.s.healthy_backends():
            self.relieve(b, now)
        self.restore(now)

    def relieve(self, b: BackendView, now: float) -> None:
        programs = self.resident(b)
        total = self.footprint(b, now)
        limit = self.limit(b)
        if total <= limit:
            return
        # first stop keeping idle KV (costliest first), then pause the shortest reasoning
        # programs (their current call finishes; the next one waits)
        acting = sorted((p for p in programs if p.phase is Phase.ACTING and p.kept),
                        key=lambda p: p.tokens * self.s.tools[p.tool or ""].expected_remaining(p.time_in_tool(now)),
                        reverse=True)
        for p in acting:
            if total <= limit:
                return
            p.kept = False
            total -= p.tokens
        for p in sorted((p for p in programs if p.phase is Phase.REASONING), key=lambda p: p.tokens):
            if total <= limit:
                return
            total -= self.cost(p, now)
            self.s.pause(p)

    def restore(self, now: float) -> None:
        queue = self.waiting()
        if not queue:
            return
        tenant_service: dict[str, float] = defaultdict(float)
        for q in self.s.programs.values():
            tenant_service[q.tenant] += q.attained

        def klass(p: Program) -> int:
            if p.phase is Phase.REASONING and p.pending and p.status is Status.PAUSED:
                return 0
            if p.status is Status.WAITING:
                return 1
            return 2

        order = sorted(queue, key=lambda p: (tenant_service[p.tenant], klass(p), p.paused_at or p.created))
        backends = {b.name: b for b in self.s.healthy_backends()}
        room = {name: self.limit(b) - self.footprint(b, now) for name, b in backends.items()}
        prepared = 0
        for p in order:
            if p.phase is Phase.ACTING and not p.pending:
                # an acting program waits for its tool; restoring it early would count memory
                # it does not use yet. Its sandbox stays; it is admitted when it asks.
                continue
            target = None
            if p.backend in backends and room[p.backend] >= self.need(p, backends[p.backend]):
                target = p.backend  # affinity: its KV may still be there
            else:
                fits = [(room[n] - self.need(p, b), n) for n, b in backends.items() if room[n] >= self.need(p, b)]
                if fits:
                    target = max(fits)[1]  # the most room left: least likely to pause again
            if target is None:
                if prepared < self.prepare_ahead:
                    self.s.prepare_sandbox(p)
                    prepared += 1
                continue
            room[target] -= self.need(p, backends[target])
            p.kept = True
            self.admit(p, target)

"""``thunderagent``: a reimplementation of ThunderAgent's scheduler (arXiv 2602.13692;
its TR router, ThunderAgent-org/ThunderAgent ``scheduler/router.py``) for side-by-side
comparison. Where the paper and the code agree, both are followed; where the paper is
the issue's spec, the paper wins, and the code's choice is an option.

- Every Δt = 5 s (``check_interval_s``): first restore from the global waiting queue,
  then check each backend for thrashing: reasoning programs' tokens plus acting
  programs' tokens weighted by f(t) = 2^-t (t: seconds in the tool; the paper — the
  code's default weight is 1, ``acting_decay=False``), plus 100 tokens per program,
  over the KV capacity (``max_total_num_tokens``, no fraction).
- Pause shortest programs first, acting ones before reasoning ones (score 1/c + 1 if
  acting). An acting program is paused at once; a reasoning one finishes its call and
  its next request is held. Nothing is sent to the engine: its KV is evicted by LRU in
  due course and rebuilt by recomputation when the program is restored.
- Restore only at the tick: the queue ordered reasoning (a request waits), new, acting,
  smallest first within each, taken while the sum fits the free capacity of all
  backends, then placed largest first by best fit (the paper; the code places on the
  backend with the most room).
- A new program is admitted at once only when nobody waits (fairness) and it fits; on
  the backend with the fewest active tokens. Requests stick to their program's backend.
"""

from __future__ import annotations

from scheduler.core.policies.base import register
from scheduler.core.policies.capacity import CapacityPolicy
from scheduler.core.state import BackendView, Phase, Program, Status

BUFFER_PER_PROGRAM = 100


@register("thunderagent")
class ThunderAgentPolicy(CapacityPolicy):
    def __init__(self, check_interval_s: float | None = None, acting_decay: bool = True) -> None:
        super().__init__(check_interval_s, 1.0)
        self.acting_decay = acting_decay

    def weight(self, p: Program, now: float) -> float:
        return 2.0 ** -p.time_in_tool(now) if self.acting_decay else 1.0

    def footprint(self, b: BackendView, now: float) -> float:
        programs = self.resident(b)
        return sum(self.cost(p, now) for p in programs) + BUFFER_PER_PROGRAM * len(programs)

    def on_request(self, p: Program, new: bool, now: float) -> None:
        if p.status is Status.ACTIVE and p.backend is not None:
            self.s.dispatch(p, p.backend)
            return
        if new and not any(q is not p for q in self.waiting()):
            backends = self.s.healthy_backends(p)
            fits = [b for b in backends if self.limit(b) - self.footprint(b, now) >= p.tokens + BUFFER_PER_PROGRAM]
            if fits:
                active = {b.name: sum(q.tokens for q in self.resident(b)) for b in fits}
                self.admit(p, min(fits, key=lambda b: (active[b.name], b.name)).name)
        # otherwise it waits for the next tick

    def after_release(self, now: float) -> None:
        pass  # restore happens at the tick only

    def on_tick(self, now: float) -> None:
        if now - self._last_check < self.check_interval_s:
            return
        self._last_check = now
        self.restore(now)
        for b in self.s.healthy_backends():
            self.relieve(b, now)

    def relieve(self, b: BackendView, now: float) -> None:
        programs = self.resident(b)
        total = self.footprint(b, now)
        limit = self.limit(b)
        if total <= limit:
            return

        def score(p: Program) -> float:
            return 1.0 / max(1, p.tokens) + (1.0 if p.phase is Phase.ACTING else 0.0)

        for p in sorted(programs, key=score, reverse=True):
            if total <= limit:
                break
            total -= self.cost(p, now) + BUFFER_PER_PROGRAM
            self.s.pause(p)

    def restore(self, now: float) -> None:
        queue = self.waiting()
        if not queue:
            return

        def group(p: Program) -> int:
            if p.status is Status.WAITING:
                return 1
            return 0 if p.phase is Phase.REASONING else 2

        room = {b.name: self.limit(b) - self.footprint(b, now) for b in self.s.healthy_backends()}
        free = sum(max(0.0, r) for r in room.values())
        chosen: list[Program] = []
        used = 0.0
        for p in sorted(queue, key=lambda p: (group(p), p.tokens)):
            need = p.tokens + BUFFER_PER_PROGRAM
            if used + need <= free:
                chosen.append(p)
                used += need
        for p in sorted(chosen, key=lambda p: -p.tokens):  # best fit decreasing
            need = p.tokens + BUFFER_PER_PROGRAM
            fits = [(left - need, name) for name, left in room.items()
                    if left >= need and (p.allowed is None or name in p.allowed)]
            if not fits:
                continue
            backend = min(fits)[1]
            room[backend] -= need
            self.admit(p, backend)

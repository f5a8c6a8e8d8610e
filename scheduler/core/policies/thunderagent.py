"""``thunderagent``: a faithful reimplementation of ThunderAgent's scheduler
(arXiv 2602.13692) for side-by-side comparison.

Every Δt = 5 s each backend is checked for thrashing: the sum of its active programs'
tokens, acting ones weighted by f(t) = 2^-t (t: seconds in the tool), over its KV
capacity. Thrashing backends pause programs by pause score 1/c + 1[acting] (short
acting programs first: recomputing a long context costs ~c²) until they fit. One
global waiting queue serves every backend; it is restored by best-fit decreasing,
reasoning programs before new ones before acting ones. A paused program's next request
is held; its KV is rebuilt by recomputation when it is restored.
"""

from __future__ import annotations

from scheduler.core.policies.base import register
from scheduler.core.policies.capacity import CapacityPolicy
from scheduler.core.state import BackendView, Phase, Program, Status


@register("thunderagent")
class ThunderAgentPolicy(CapacityPolicy):
    def weight(self, p: Program, now: float) -> float:
        return 2.0 ** -p.time_in_tool(now)

    def relieve(self, b: BackendView, now: float) -> None:
        programs = self.resident(b)
        total = sum(self.cost(p, now) for p in programs)
        limit = self.limit(b)
        if total <= limit:
            return

        def score(p: Program) -> float:
            return 1.0 / max(1, p.tokens) + (1.0 if p.phase is Phase.ACTING else 0.0)

        for p in sorted(programs, key=score, reverse=True):
            if total <= limit:
                break
            total -= self.cost(p, now)
            self.s.pause(p)

    def restore(self, now: float) -> None:
        queue = self.waiting()
        if not queue:
            return

        def klass(p: Program) -> int:
            if p.status is Status.PAUSED and p.phase is Phase.REASONING:
                return 0
            return 1 if p.status is Status.WAITING else 2

        room = self.room(now)
        for p in sorted(queue, key=lambda p: (klass(p), -p.tokens)):
            backend = self.place(p, now, room)
            if backend is None:
                continue
            room[backend] -= p.tokens
            self.admit(p, backend)

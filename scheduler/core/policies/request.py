"""``request``: the request-centric baseline. What a stock engine plus SGLang's
cache-aware gateway does: every request is dispatched the moment it arrives, first come
first served; the engine's LRU decides whose KV survives a tool call."""

from __future__ import annotations

from scheduler.core.policies.base import Policy, cache_aware_pick, register
from scheduler.core.state import Program


@register("request")
class RequestPolicy(Policy):
    def on_request(self, p: Program, new: bool, now: float) -> None:
        b = cache_aware_pick(p, self.s.healthy_backends(p))
        if new:
            self.s.prepare_sandbox(p)
        self.s.resume(p, b.name)

"""``ttl``: Continuum (arXiv 2511.02230) — keep a program's KV across a tool call for a
time-to-live chosen from that tool's duration history.

At tool start the TTL τ maximises P(tool returns within τ)·(recompute time saved) -
(memory held)·τ, both in GPU-seconds: keeping c tokens for τ seconds denies c/capacity
of the engine for τ seconds; returning within τ saves prefill of c tokens. Cold start
uses an exponential prior. Pins expire at τ and are released one at a time under
memory pressure (a queue on a full backend). Requests are served program-level first
come first served through the engine's priority. Pinning needs an engine lever: the
simulator's radix lock stands in for Continuum's vLLM pin (SGLang has none).
"""

from __future__ import annotations

from typing import ClassVar

from scheduler.core.policies.base import Policy, cache_aware_pick, register
from scheduler.core.state import BackendView, Program

_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


@register("ttl")
class TTLPolicy(Policy):
    # resumes go first by their priority
    engine_flags: ClassVar[dict[str, object]] = {"enable_priority_scheduling": True}

    def __init__(self, pressure_used_fraction: float = 0.95) -> None:
        self.pressure = pressure_used_fraction
        self._order: dict[str, int] = {}

    def on_request(self, p: Program, new: bool, now: float) -> None:
        if new:
            self._order[p.id] = len(self._order)
            self.s.prepare_sandbox(p)
        b = (self.s.backends[p.backend] if p.pinned and p.backend in self.s.backends
             else cache_aware_pick(p, self.s.healthy_backends(p)))
        self.s.resume(p, b.name, priority=-self._order.get(p.id, 0))

    def ttl(self, p: Program) -> float:
        b = self.s.backends.get(p.backend or "")
        if b is None or p.tool is None:
            return 0.0
        d = self.s.tools[p.tool]
        saved = b.prefill_s_per_token * b.capacity  # per token kept: recompute saved x capacity
        best_tau, best = 0.0, 0.0
        for q in _QUANTILES:
            tau = d.quantile(q)
            value = d.cdf(tau) * saved - tau
            if value > best:
                best_tau, best = tau, value
        return best_tau

    def on_tool_start(self, p: Program, now: float) -> None:
        tau = self.ttl(p)
        if p.pinned:
            self.s.unpin(p)  # the pin moves to the context that now includes the last turn
        if tau > 0:
            self.s.pin(p, until=now + tau)

    def on_finished(self, p: Program, now: float) -> None:
        self.s.unpin(p)

    def on_tick(self, now: float) -> None:
        for p in list(self.s.programs.values()):
            if p.pinned and p.pin_until is not None and now >= p.pin_until:
                self.s.unpin(p)

    def on_backend(self, b: BackendView, now: float) -> None:
        if b.queued > 0 and b.used >= self.pressure * b.capacity:
            pinned = [p for p in self.s.programs.values() if p.pinned and p.backend == b.name]
            if pinned:  # one at a time: the pin closest to its expiry goes first
                self.s.unpin(min(pinned, key=lambda p: p.pin_until or 0.0))

    def on_release(self, p: Program, now: float) -> None:
        self._order.pop(p.id, None)

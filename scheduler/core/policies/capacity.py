"""Shared machinery of the policies that manage KV capacity by pausing programs:
which programs are resident on which backend, their weighted footprint, the global
waiting queue and restoring from it. ThunderAgent and ours differ in the weights,
the order and the admission rule, not in this bookkeeping."""

from __future__ import annotations

from scheduler.core.policies.base import Policy
from scheduler.core.state import BackendView, Phase, Program, Status


class CapacityPolicy(Policy):
    check_interval_s: float = 5.0

    def __init__(self, check_interval_s: float | None = None, capacity_fraction: float = 1.0) -> None:
        if check_interval_s is not None:
            self.check_interval_s = check_interval_s
        self.capacity_fraction = capacity_fraction
        self._last_check = -1e18

    # ---- accounting -------------------------------------------------------------------

    def weight(self, p: Program, now: float) -> float:
        """The share of an *acting* program's tokens that counts as resident."""
        raise NotImplementedError

    def cost(self, p: Program, now: float) -> float:
        """Tokens ``p`` is counted for on its backend."""
        if p.phase is Phase.REASONING:
            return float(p.tokens)
        return p.tokens * self.weight(p, now)

    def resident(self, b: BackendView) -> list[Program]:
        return list(self.s.resident[b.name].values())

    def footprint(self, b: BackendView, now: float) -> float:
        return sum(self.cost(p, now) for p in self.resident(b))

    def limit(self, b: BackendView) -> float:
        return b.capacity * self.capacity_fraction

    def fits_alone(self, p: Program, b: BackendView) -> bool:
        return p.tokens <= self.limit(b)

    def waiting(self) -> list[Program]:
        return list(self.s.waiting.values())

    # ---- hooks ---------------------------------------------------------------------------

    def on_request(self, p: Program, new: bool, now: float) -> None:
        if p.status is Status.ACTIVE and p.backend is not None:
            self.s.dispatch(p, p.backend)
        elif new:
            self.restore(now)
        # paused: held until restored

    def after_release(self, now: float) -> None:
        self.restore(now)

    def on_tick(self, now: float) -> None:
        if now - self._last_check < self.check_interval_s:
            return
        self._last_check = now
        for b in self.s.healthy_backends():
            self.relieve(b, now)
        self.restore(now)

    # ---- pause and restore ---------------------------------------------------------------

    def relieve(self, b: BackendView, now: float) -> None:
        raise NotImplementedError

    def restore(self, now: float) -> None:
        raise NotImplementedError

    def place(self, p: Program, now: float, room: dict[str, float]) -> str | None:
        """Best fit: the backend where ``p`` leaves the least room (its own first on a tie)."""
        need = float(p.tokens)
        fits = [(left - need, name != p.backend, name) for name, left in room.items()
                if left >= need and (p.allowed is None or name in p.allowed)]
        return min(fits)[2] if fits else None

    def room(self, now: float) -> dict[str, float]:
        return {b.name: self.limit(b) - self.footprint(b, now) for b in self.s.healthy_backends()}

    def admit(self, p: Program, backend: str) -> None:
        self.s.prepare_sandbox(p)
        self.s.resume(p, backend)

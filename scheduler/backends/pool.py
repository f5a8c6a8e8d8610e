"""A set of backends seen as one: failover, circuit breakers, periodic health checks.

The scheduler decides *where* a request should go (``prefer=``); the pool decides
what happens when that backend fails. The rule for a retry is the caller's view:
a request may be sent again to another backend only while the caller has seen
none of its output. So ``stream`` fails over up to its first chunk and raises
``StreamInterrupted`` after it; ``generate`` (which shows nothing until the end)
also repeats a request whose stream was cut, unless ``retry_interrupted=False``.

A breaker per backend keeps traffic off a backend that keeps failing: it opens
after ``failure_threshold`` consecutive failures, stays open for a cool-down that
doubles on each re-open (capped), then lets one trial request through
(half-open). A periodic health check closes a breaker whose backend answers
``/health`` again, and opens one whose backend stops answering, so a dead backend
is found before a user request pays for it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterable, Sequence

from scheduler.backends.base import (
    Backend, BackendError, BackendUnavailable, Capacity, GenerateRequest, Generation, GenerationChunk, Load,
    StreamInterrupted,
)

log = logging.getLogger("scheduler.backends.pool")


class BreakerState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    """Consecutive-failure breaker with exponential cool-down. Sans-I/O: time comes from ``clock``."""

    failure_threshold: int = 3
    cooldown_s: float = 2.0
    max_cooldown_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    current_cooldown_s: float = field(default=0.0)
    _trial_in_flight: bool = False

    def allow(self) -> bool:
        """May a request go to this backend now? In half-open, only one trial at a time."""
        if self.state is BreakerState.OPEN and self.clock() - self.opened_at >= self.current_cooldown_s:
            self.state = BreakerState.HALF_OPEN
            self._trial_in_flight = False
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.HALF_OPEN and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        return False

    def available(self) -> bool:
        """Like ``allow`` but without taking the half-open trial slot (for ranking)."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            return self.clock() - self.opened_at >= self.current_cooldown_s
        return not self._trial_in_flight

    def record_success(self) -> None:
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.current_cooldown_s = 0.0
        self._trial_in_flight = False

    def record_failure(self) -> None:
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.failure_threshold:
            self._open()

    def trip(self) -> None:
        """Open at once (a failed health check is conclusive, no threshold)."""
        self.failures = max(self.failures, self.failure_threshold)
        if self.state is not BreakerState.OPEN:
            self._open()

    def _open(self) -> None:
        reopened = self.state is BreakerState.HALF_OPEN
        self.current_cooldown_s = (min(self.current_cooldown_s * 2, self.max_cooldown_s)
                                   if reopened and self.current_cooldown_s else self.cooldown_s)
        self.state = BreakerState.OPEN
        self.opened_at = self.clock()
        self._trial_in_flight = False


@dataclass
class Member:
    backend: Backend
    breaker: CircuitBreaker
    healthy: bool = True
    last_check: float | None = None
    last_error: str | None = None
    requests: int = 0
    failures: int = 0


class NoBackendAvailable(BackendUnavailable):
    """Every backend is down, open, or already failed this request."""


class BackendPool(Backend):
    """Backends behind one ``Backend``: failover before output, breakers, health checks."""

    def __init__(
        self,
        backends: Iterable[Backend],
        *,
        name: str = "pool",
        failure_threshold: int = 3,
        cooldown_s: float = 2.0,
        max_cooldown_s: float = 60.0,
        health_interval_s: float = 5.0,
        health_timeout_s: float = 2.0,
        max_attempts: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.members: dict[str, Member] = {}
        for b in backends:
            if b.name in self.members:
                raise ValueError(f"two backends are named {b.name!r}")
            self.members[b.name] = Member(b, CircuitBreaker(failure_threshold, cooldown_s, max_cooldown_s, clock))
        if not self.members:
            raise ValueError("a pool needs at least one backend")
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.max_attempts = max_attempts or len(self.members)
        self._where: dict[str, str] = {}  # rid -> backend serving it now
        self._health_task: asyncio.Task[None] | None = None
        self._rr = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Check every backend once, then keep checking every ``health_interval_s``."""
        await self.check_health()
        if self._health_task is None:
            self._health_task = asyncio.create_task(self._health_loop(), name=f"{self.name}-health")

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            try:
                await self._health_task
            except asyncio.CancelledError:
                pass
            self._health_task = None
        for m in self.members.values():
            await m.backend.close()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.check_health()
            except Exception:  # never let the checker die
                log.exception("health check round failed")

    async def check_health(self) -> dict[str, bool]:
        results = await asyncio.gather(*(self._check(m) for m in self.members.values()))
        return dict(zip(self.members, results))

    async def _check(self, m: Member) -> bool:
        try:
            ok = await asyncio.wait_for(m.backend.health(), self.health_timeout_s)
        except (asyncio.TimeoutError, BackendError, OSError) as exc:
            ok, m.last_error = False, f"{type(exc).__name__}: {exc}"
        was = m.healthy
        m.healthy, m.last_check = ok, time.time()
        if ok:
            if m.breaker.state is not BreakerState.CLOSED:
                log.info("backend %s healthy again: breaker closed", m.backend.name)
            m.breaker.record_success()
        else:
            m.last_error = m.last_error or "health check failed"
            m.breaker.trip()
            if was:
                log.warning("backend %s unhealthy: %s", m.backend.name, m.last_error)
        return ok

    # -- choosing --------------------------------------------------------------------------

    def candidates(self, prefer: Sequence[str] = (), exclude: Iterable[str] = ()) -> list[str]:
        """Backends to try, in order: the preferred ones first, then the others round-robin;
        unhealthy or open-breaker backends are left out."""
        skip = set(exclude)
        for p in prefer:
            if p not in self.members:
                raise ValueError(f"unknown backend {p!r}")
        names = list(self.members)
        self._rr = (self._rr + 1) % len(names)
        rest = names[self._rr:] + names[:self._rr]
        order = [n for n in prefer] + [n for n in rest if n not in prefer]
        return [n for n in order if n not in skip and self.members[n].healthy and self.members[n].breaker.available()]

    def state(self) -> list[dict[str, object]]:
        return [{"name": n, "healthy": m.healthy, "breaker": m.breaker.state.value, "requests": m.requests,
                 "failures": m.failures, "last_error": m.last_error, "last_check": m.last_check}
                for n, m in self.members.items()]

    # -- Backend ---------------------------------------------------------------------------

    async def stream(  # type: ignore[override]
        self, request: GenerateRequest, *, prefer: Sequence[str] = (),
    ) -> AsyncIterator[GenerationChunk]:
        async for chunk in self._stream(request, prefer, retry_interrupted=False):
            yield chunk

    async def generate(  # type: ignore[override]
        self, request: GenerateRequest, *, prefer: Sequence[str] = (), retry_interrupted: bool = True,
    ) -> Generation:
        chunks: list[GenerationChunk] = []
        async for chunk in self._stream(request, prefer, retry_interrupted=retry_interrupted, restart=chunks.clear):
            chunks.append(chunk)
        return Generation.from_chunks(request.rid, chunks)

    async def _stream(
        self, request: GenerateRequest, prefer: Sequence[str], *, retry_interrupted: bool,
        restart: Callable[[], None] | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        tried: list[str] = []
        errors: list[str] = []
        while len(tried) < self.max_attempts:
            name = next((n for n in self.candidates(prefer, tried) if self.members[n].breaker.allow()), None)
            if name is None:
                break
            tried.append(name)
            m = self.members[name]
            m.requests += 1
            self._where[request.rid] = name
            seen = False
            try:
                async for chunk in m.backend.stream(request):
                    seen = True
                    yield chunk
                m.breaker.record_success()
                return
            except BackendError as exc:
                errors.append(f"{name}: {exc}")
                m.failures += 1
                m.last_error = f"{type(exc).__name__}: {exc}"
                if exc.retryable or isinstance(exc, StreamInterrupted):
                    m.breaker.record_failure()  # the backend misbehaved (a 4xx is the request's fault)
                else:
                    m.breaker.record_success()
                cut = isinstance(exc, StreamInterrupted) or seen
                if cut and not retry_interrupted:
                    raise
                if not cut and not exc.retryable:
                    raise
                if cut:
                    await self._abort_quietly(m.backend, request.rid)
                    if restart is not None:
                        restart()
                log.warning("backend %s failed request %s (%s); trying another", name, request.rid, exc)
            finally:
                self._where.pop(request.rid, None)
        raise NoBackendAvailable(
            f"{self.name}: no backend could serve {request.rid}" + (f": {'; '.join(errors)}" if errors else
                                                                      " (all unhealthy or open)"),
            backend=self.name)

    @staticmethod
    async def _abort_quietly(backend: Backend, rid: str) -> None:
        try:
            await asyncio.wait_for(backend.abort(rid), 2.0)
        except Exception:  # the backend may be gone; the abort is a courtesy
            pass

    async def abort(self, rid: str) -> None:
        name = self._where.get(rid)
        if name is not None:
            await self.members[name].backend.abort(rid)

    async def capacity(self) -> Capacity:
        caps = await asyncio.gather(*(m.backend.capacity() for m in self.members.values() if m.healthy),
                                    return_exceptions=True)
        ok = [c for c in caps if isinstance(c, Capacity)]
        if not ok:
            raise NoBackendAvailable(f"{self.name}: no healthy backend reports capacity", backend=self.name)
        ctx = [c.max_context_tokens for c in ok if c.max_context_tokens]
        return Capacity(max_total_tokens=sum(c.max_total_tokens for c in ok), max_context_tokens=min(ctx) if ctx
                        else None, ranks_kv=all(c.ranks_kv for c in ok))

    async def load(self) -> Load:
        loads = await asyncio.gather(*(m.backend.load() for m in self.members.values() if m.healthy),
                                     return_exceptions=True)
        ok = [x for x in loads if isinstance(x, Load)]
        totals = [x.total_tokens for x in ok if x.total_tokens is not None]
        return Load(running=sum(x.running for x in ok), queued=sum(x.queued for x in ok),
                    used_tokens=sum(x.used_tokens for x in ok), total_tokens=sum(totals) if totals else None)

    async def health(self) -> bool:
        return any(m.healthy and m.breaker.available() for m in self.members.values())

"""The sandboxes of all programs: created ahead of need, bounded, collected when a program ends.

The scheduler calls :meth:`SandboxPool.prepare` when it expects a program to reach its first tool
call (so the workspace exists by then), the agent loop :meth:`acquire`\\ s it, and whatever ends
the program (answer, failure, cancel, release by the gateway) calls :meth:`release`, which kills
what still runs and deletes the workspace. :meth:`exec_slot` bounds how many tool commands run at
once across all programs, so a burst of tool calls cannot take every core from the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass

from tools.sandbox.base import Sandbox, SandboxError

log = logging.getLogger(__name__)

Factory = Callable[[str], Awaitable[Sandbox]]


@dataclass
class PoolStats:
    """Counters since the pool started (for metrics and for tests of the prewarm path)."""

    prepared: int = 0            # creations started by prepare()
    acquired_ready: int = 0      # acquire() found the sandbox already created
    acquired_waited: int = 0     # acquire() found it being created and waited
    warm_used: int = 0           # prepare() or acquire() handed out a prewarmed spare
    acquired_cold: int = 0       # acquire() had to create it itself
    released: int = 0
    created: int = 0
    failed: int = 0
    creation_seconds: float = 0.0


class SandboxPool:
    """Program id -> its sandbox. All methods run on the event loop; none blocks it."""

    def __init__(self, factory: Factory, *, max_sandboxes: int = 64, max_concurrent_exec: int = 8,
                 warm: int = 0) -> None:
        if max_sandboxes < 1 or max_concurrent_exec < 1 or warm < 0:
            raise ValueError("max_sandboxes and max_concurrent_exec must be >= 1, warm >= 0")
        self.factory = factory
        self.max_sandboxes = max_sandboxes
        self.max_concurrent_exec = max_concurrent_exec
        self.warm = min(warm, max_sandboxes)
        self.stats = PoolStats()
        self._entries: dict[str, asyncio.Task[Sandbox]] = {}
        self._spares: list[asyncio.Task[Sandbox]] = []
        self._disk: dict[str, int] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max_concurrent_exec)
        self._exec_active = 0
        self._exec_waiting = 0
        self._closed = False

    # -- creation ------------------------------------------------------------------------------

    def _count(self) -> int:
        return len(self._entries) + len(self._spares)

    def _start(self, sandbox_id: str) -> asyncio.Task[Sandbox]:
        task = asyncio.get_running_loop().create_task(self._create(sandbox_id), name=f"sandbox-create-{sandbox_id}")
        task.add_done_callback(_consume)
        return task

    async def _create(self, sandbox_id: str) -> Sandbox:
        t0 = time.monotonic()
        try:
            sandbox = await self.factory(sandbox_id)
        except BaseException:
            self.stats.failed += 1
            raise
        self.stats.created += 1
        self.stats.creation_seconds += time.monotonic() - t0
        return sandbox

    def _take_spare(self) -> asyncio.Task[Sandbox] | None:
        """A prewarmed sandbox that is ready (never one still being created or failed)."""
        for task in self._spares:
            if task.done() and not task.cancelled() and task.exception() is None:
                self._spares.remove(task)
                return task
        return None

    def _refill(self) -> None:
        """Start spares until ``warm`` exist, within the bound; dead spares are dropped."""
        if self._closed:
            return
        self._spares = [t for t in self._spares if not (t.done() and (t.cancelled() or t.exception()))]
        while len(self._spares) < self.warm and self._count() < self.max_sandboxes:
            self._spares.append(self._start(f"warm-{uuid.uuid4().hex[:12]}"))

    async def start(self) -> None:
        """Create the warm spares now and wait for them (optional: they are also made lazily)."""
        self._refill()
        await asyncio.gather(*self._spares, return_exceptions=True)

    def prepare(self, program_id: str) -> bool:
        """Start creating ``program_id``'s sandbox in the background; returns at once.

        Idempotent. A ready spare is assigned at once. Returns False when nothing could be started
        (pool closed or full): ``acquire`` will then try again and report the error.
        """
        if self._closed:
            return False
        if program_id in self._entries:
            return True
        spare = self._take_spare()
        if spare is not None:
            self._entries[program_id] = spare
            self.stats.warm_used += 1
        elif self._count() >= self.max_sandboxes:
            log.warning("sandbox pool full (%d); not preparing %s", self.max_sandboxes, program_id)
            return False
        else:
            self._entries[program_id] = self._start(program_id)
            self.stats.prepared += 1
        self._refill()
        return True

    async def acquire(self, program_id: str) -> Sandbox:
        """The program's sandbox: the prepared one (waiting for it if still being created), a warm
        spare, or a new one. ``SandboxError`` when the pool is full or creation failed."""
        if self._closed:
            raise SandboxError("the sandbox pool is closed")
        task = self._entries.get(program_id)
        if task is None:
            task = self._take_spare()
            if task is not None:
                self.stats.warm_used += 1
            elif self._count() >= self.max_sandboxes:
                raise SandboxError(f"sandbox limit reached ({self.max_sandboxes} sandboxes)")
            else:
                task = self._start(program_id)
                self.stats.acquired_cold += 1
            self._entries[program_id] = task
            self._refill()
        elif task.done():
            self.stats.acquired_ready += 1
        else:
            self.stats.acquired_waited += 1
        try:
            sandbox = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and self._entries.get(program_id) is task:
                del self._entries[program_id]
            raise
        except Exception as exc:
            if self._entries.get(program_id) is task:
                del self._entries[program_id]
            if isinstance(exc, SandboxError):
                raise
            raise SandboxError(f"could not create the sandbox: {exc}") from exc
        if self._entries.get(program_id) is not task:
            raise SandboxError("the sandbox was released while it was being acquired")
        return sandbox

    def is_ready(self, program_id: str) -> bool:
        task = self._entries.get(program_id)
        return task is not None and task.done() and not task.cancelled() and task.exception() is None

    def get(self, program_id: str) -> Sandbox | None:
        """The program's sandbox if it is ready, without creating or waiting."""
        return self._entries[program_id].result() if self.is_ready(program_id) else None

    # -- ending --------------------------------------------------------------------------------

    async def release(self, program_id: str) -> None:
        """Kill what the program's sandbox runs and delete it. Idempotent; safe to cancel (the
        deletion goes on in the background)."""
        task = self._entries.pop(program_id, None)
        self._disk.pop(program_id, None)
        if task is None:
            return
        self.stats.released += 1
        await self._dispose(task)
        self._refill()

    async def _dispose(self, task: asyncio.Task[Sandbox]) -> None:
        async def close() -> None:
            try:
                sandbox = await task
            except BaseException:
                return
            try:
                await sandbox.close()
            except Exception:
                log.exception("closing sandbox %s failed", getattr(sandbox, "id", "?"))

        job = asyncio.get_running_loop().create_task(close())
        self._background.add(job)
        job.add_done_callback(self._background.discard)
        await asyncio.shield(job)

    async def kill(self, program_id: str) -> None:
        """Kill the commands the program's sandbox runs now (cancel); the sandbox stays."""
        sandbox = self.get(program_id)
        if sandbox is not None:
            await sandbox.kill()

    async def close(self) -> None:
        """Release every sandbox, spares too. The pool accepts nothing afterwards."""
        self._closed = True
        tasks = list(self._entries.values()) + self._spares
        self._entries.clear()
        self._spares.clear()
        self._disk.clear()
        await asyncio.gather(*(self._dispose(t) for t in tasks), return_exceptions=True)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    # -- accounting ----------------------------------------------------------------------------

    async def disk_usage(self) -> dict[str, int]:
        """Bytes each ready program's workspace holds, measured now."""
        ready = {pid: t.result() for pid, t in self._entries.items() if self.is_ready(pid)}
        sizes = await asyncio.gather(*(sb.disk_bytes() for sb in ready.values()), return_exceptions=True)
        self._disk = {pid: n for pid, n in zip(ready, sizes, strict=True) if isinstance(n, int)}
        return dict(self._disk)

    @property
    def total_disk_bytes(self) -> int:
        """Sum of the last measurements (``disk_usage`` refreshes them)."""
        return sum(self._disk.values())

    @contextlib.asynccontextmanager
    async def exec_slot(self) -> AsyncIterator[None]:
        """Hold one of ``max_concurrent_exec`` slots while a tool command runs."""
        self._exec_waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._exec_waiting -= 1
        self._exec_active += 1
        try:
            yield
        finally:
            self._exec_active -= 1
            self._slots.release()

    def state_counts(self) -> dict[str, int]:
        """Sandboxes by state, for the metrics: creating, ready, failed, warm (spares)."""
        counts = {"creating": 0, "ready": 0, "failed": 0, "warm": 0}
        for task in self._entries.values():
            if not task.done():
                counts["creating"] += 1
            elif task.cancelled() or task.exception() is not None:
                counts["failed"] += 1
            else:
                counts["ready"] += 1
        counts["warm"] = len(self._spares)
        return counts

    def snapshot(self) -> dict[str, float | int]:
        """Counters and gauges in one flat dict."""
        return {**asdict(self.stats), "sandboxes": self._count(), "exec_active": self._exec_active,
                "exec_waiting": self._exec_waiting, "disk_bytes": self.total_disk_bytes}

    def __len__(self) -> int:
        return self._count()

    def __contains__(self, program_id: object) -> bool:
        return program_id in self._entries


def _consume(task: asyncio.Task[Sandbox]) -> None:
    """Mark a creation failure as seen: ``acquire`` reports it; nobody may be waiting."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("sandbox creation failed: %s", task.exception())


__all__ = ["Factory", "PoolStats", "SandboxPool"]

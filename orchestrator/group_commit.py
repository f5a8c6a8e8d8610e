"""Group commit: concurrent callers' writes go to the database together, one statement a batch.

Why: a submission costs the database a transaction (its commit, its WAL flush) and the service a
statement's round trip through asyncpg, and the submissions of one tenant with a limit on its
active runs must also take the tenant's lock in turn. Under load, callers queue for that lock one
round trip after another. Here the first caller's write goes at once, alone (no added latency
when the service is quiet); whatever arrives while it is in flight goes next, as one batch, and
so on. A batch's latency is one write, whatever its size, and its cost is shared.

A ``GroupCommit`` is keyed by what a batch may mix (a tenant, for writes under its lock); each
key has at most one batch in flight, and different keys do not wait on each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Returns, for each item of the batch in order, its result or the exception to raise to its caller.
Flush = Callable[[Hashable, Sequence[T]], Awaitable[Sequence["R | BaseException"]]]


@dataclass
class _Lane(Generic[T, R]):
    waiting: list[tuple[T, asyncio.Future[R]]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


class GroupCommit(Generic[T, R]):
    """Batch ``submit`` calls per key; ``flush`` writes one batch (at most ``max_batch`` items).

    A caller that is cancelled while its batch is in flight does not cancel the batch: the write
    goes on for the others (and may commit its item; as with any write whose answer is lost).
    If ``flush`` itself raises, every caller of that batch gets the exception.
    """

    def __init__(self, flush: Flush[T, R], *, max_batch: int = 128) -> None:
        self._flush = flush
        self.max_batch = max_batch
        self._lanes: dict[Hashable, _Lane[T, R]] = {}
        self.batches = 0  # flushes made (for tests and metrics)
        self.items = 0  # items written in them

    async def submit(self, key: Hashable, item: T) -> R:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        lane.waiting.append((item, fut))
        if lane.task is None:
            lane.task = asyncio.create_task(self._drain(key, lane), name="group-commit")
        return await fut

    async def _drain(self, key: Hashable, lane: _Lane[T, R]) -> None:
        try:
            while lane.waiting:
                batch, lane.waiting = lane.waiting[:self.max_batch], lane.waiting[self.max_batch:]
                self.batches += 1
                self.items += len(batch)
                try:
                    results: Sequence[R | BaseException] = await self._flush(key, [item for item, _ in batch])
                    if len(results) != len(batch):  # pragma: no cover - a flush function's bug
                        raise RuntimeError(f"flush returned {len(results)} results for {len(batch)} items")
                except Exception as exc:
                    results = [exc] * len(batch)
                for (_, fut), result in zip(batch, results, strict=True):
                    if fut.done():  # its caller was cancelled
                        continue
                    if isinstance(result, BaseException):
                        fut.set_exception(result)
                    else:
                        fut.set_result(result)
        finally:
            lane.task = None
            if lane.waiting:  # cancelled (the service is stopping): nobody is left to write these
                for _, fut in lane.waiting:
                    if not fut.done():
                        fut.set_exception(RuntimeError("the service is stopping"))
                lane.waiting = []
            if self._lanes.get(key) is lane:
                del self._lanes[key]

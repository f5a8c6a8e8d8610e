"""What one execution has yet to write, written in as few transactions as the workflow allows.

A step used to cost two fenced transactions (``step.started``, then the checkpoint with
``step.completed``) and every ``emit`` one more, each with its own bus publish. The journal
queues them instead and writes whatever is queued in one transaction (``RunStore.write``):

- a step's checkpoint is written before ``step`` returns, together with everything queued
  before it, its own ``step.started`` included when that has not gone out yet;
- ``step.started`` and emitted events go out in the background as soon as the event loop
  gets to it, so a reader sees a slow step start while it runs; a step that finishes without
  waiting on anything shares one write with its start;
- events emitted while a write is in flight go together in the next one (group commit), so
  a run that streams many events writes them in batches;
- the run's outcome takes what is left with it, in the same transaction.

Writes are serialised per execution, so events keep the order in which they were produced.
Nothing queued is lost for good when the process dies: a replay produces the same events
again, and the ones the log already holds are recognised by their ``op_key``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from orchestrator.runs.store import Batch, Lease, LeaseLost, Outcome, PendingEvent, RunStore, StepWrite

log = logging.getLogger(__name__)

# Queued events past which ``event`` makes its caller wait for a write (back-pressure).
MAX_QUEUED = 512


class Journal:
    def __init__(self, store: RunStore, lease: Lease, on_lost: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.lease = lease
        self._on_lost = on_lost
        self._events: list[PendingEvent] = []
        self._steps: dict[int, StepWrite] = {}
        self._lock = asyncio.Lock()
        self._soon: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        return len(self._events) + len(self._steps)

    def event(self, type_: str, data: dict[str, Any], op_key: str | None = None) -> None:
        self._events.append(PendingEvent(type_, data, op_key, time.time()))

    def step(self, write: StepWrite) -> None:
        self._steps[write.step_id] = write  # a later state of the same step replaces a queued one

    def flush_soon(self) -> None:
        """Write what is queued in the background, once the caller next yields to the loop."""
        if self._soon is None or self._soon.done():
            self._soon = asyncio.create_task(self._background(), name=f"journal-{self.lease.run_id}")

    async def emit(self, type_: str, data: dict[str, Any], op_key: str | None = None) -> None:
        self.event(type_, data, op_key)
        if len(self._events) >= MAX_QUEUED:
            await self.flush()
        else:
            self.flush_soon()

    async def _background(self) -> None:
        await asyncio.sleep(0)  # a step that waits on nothing finishes first and takes its start along
        try:
            await self.flush()
        except asyncio.CancelledError:
            raise
        except LeaseLost:
            self._on_lost()
        except Exception:  # kept queued: the next write (a checkpoint, the outcome) retries and raises
            log.warning("background journal write failed", exc_info=True,
                        extra={"run_id": self.lease.run_id})

    async def flush(self, outcome: Outcome | None = None) -> None:
        """Write everything queued, with ``outcome`` when given, in one fenced transaction."""
        async with self._lock:
            events, steps = self._events, self._steps
            if not events and not steps and outcome is None:
                return
            self._events, self._steps = [], {}
            try:
                await self.store.write(self.lease, Batch(events, list(steps.values()), outcome))
            except BaseException:
                self._events = events + self._events  # back in front of anything queued meanwhile
                self._steps = {**steps, **self._steps}
                raise

    async def close(self) -> None:
        """Stop the background write (the execution is over; what is left is not written)."""
        if self._soon is not None and not self._soon.done():
            self._soon.cancel()
            try:
                await self._soon
            except (asyncio.CancelledError, Exception):
                pass

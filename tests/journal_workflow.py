"""A test workflow whose steps write to a journal file, so a test can count executions
across process crashes and pauses. Loaded into the service with ``ORCH_WORKFLOW_MODULES``.

Each line is ``<start|end|cancel> <step> pid=<pid> worker=<worker id> mono=<s> wall=<s>``:
``mono`` (CLOCK_MONOTONIC, shared by the processes of one machine) orders executions, and
``wall`` compares with the database's ``created_at`` of a claim.
"""

from __future__ import annotations

import asyncio
import os
import time

from pydantic import BaseModel

from orchestrator import RunContext, WorkflowRegistry


class JournalInput(BaseModel):
    journal: str
    steps: int = 6
    step_seconds: float = 0.4


def _write(path: str, what: str, i: int, worker: str) -> None:
    line = f"{what} {i} pid={os.getpid()} worker={worker} mono={time.monotonic():.6f} wall={time.time():.6f}"
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


async def _step(path: str, i: int, seconds: float, worker: str) -> int:
    _write(path, "start", i, worker)
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        _write(path, "cancel", i, worker)  # an execution stopped mid-step also leaves its trace
        raise
    _write(path, "end", i, worker)
    return i * 10


async def journal(ctx: RunContext, inp: JournalInput) -> dict[str, int]:
    total = 0
    for i in range(inp.steps):
        total += await ctx.step(f"journal-{i}", _step, inp.journal, i, inp.step_seconds, ctx.lease.owner)
        await ctx.emit("run.progress", {"done": i + 1})
    return {"total": total}


def register(registry: WorkflowRegistry) -> None:
    registry.workflow("journal", JournalInput)(journal)

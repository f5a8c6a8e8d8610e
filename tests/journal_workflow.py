"""A test workflow whose steps write to a journal file, so a test can count executions
across process crashes. Loaded into the service with ``ORCH_WORKFLOW_MODULES``."""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel

from orchestrator import RunContext, WorkflowRegistry


class JournalInput(BaseModel):
    journal: str
    steps: int = 6
    step_seconds: float = 0.4


def _write(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


async def _step(path: str, i: int, seconds: float) -> int:
    _write(path, f"start {i} pid={os.getpid()}")
    await asyncio.sleep(seconds)
    _write(path, f"end {i} pid={os.getpid()}")
    return i * 10


async def journal(ctx: RunContext, inp: JournalInput) -> dict[str, int]:
    total = 0
    for i in range(inp.steps):
        total += await ctx.step(f"journal-{i}", _step, inp.journal, i, inp.step_seconds)
        await ctx.emit("run.progress", {"done": i + 1})
    return {"total": total}


def register(registry: WorkflowRegistry) -> None:
    registry.workflow("journal", JournalInput)(journal)

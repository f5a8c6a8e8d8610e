"""Small built-in workflows: ``echo``, ``demo`` (checkpointed steps), ``sleep`` (durable wait), and
``steps`` / ``events``, which do nothing but checkpoint or emit, so that a benchmark
(bench/vs_dbos.py) times the durable machinery alone."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.runs.context import RunContext
from orchestrator.workflows.registry import WorkflowRegistry


class EchoInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: Any = Field(description="Returned unchanged as the run's output.")


class DemoInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(default=3, ge=1, le=1000, description="How many checkpointed steps to run.")
    step_seconds: float = Field(default=0.5, ge=0, le=3600, description="How long each step works.")
    fail_at_step: int | None = Field(default=None, ge=0, description="Raise in this step (to see a failed run).")


class SleepInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float = Field(ge=0, le=86_400, description="How long the run waits (durably).")


class StepsInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(ge=1, le=10_000, description="How many checkpointed no-op steps to run.")


class EventsInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: int = Field(ge=1, le=10_000, description="How many progress events to append to the run's stream.")


async def echo(ctx: RunContext, inp: EchoInput) -> Any:
    """Return the input message."""
    return await ctx.step("echo", _identity, inp.message)


async def _identity(value: Any) -> Any:
    return value


async def demo(ctx: RunContext, inp: DemoInput) -> dict[str, Any]:
    """Run N steps that each work for a while; every step is a checkpoint."""
    total = 0
    for i in range(inp.steps):
        result = await ctx.step(f"work-{i}", _work, i, inp.step_seconds, inp.fail_at_step == i)
        total += result["value"]
        await ctx.emit("run.progress", {"done": i + 1, "of": inp.steps})
    return {"steps": inp.steps, "total": total}


async def _work(i: int, seconds: float, fail: bool) -> dict[str, int]:
    await asyncio.sleep(seconds)
    if fail:
        raise RuntimeError(f"step {i} failed as asked")
    return {"i": i, "value": i * i}


async def sleep(ctx: RunContext, inp: SleepInput) -> dict[str, float]:
    """Wait durably: the run is ``waiting`` and a restart sleeps only what is left."""
    await ctx.sleep(inp.seconds)
    return {"slept": inp.seconds}


async def steps(ctx: RunContext, inp: StepsInput) -> dict[str, int]:
    """N checkpointed steps that do no work: the cost of a step is the store's alone."""
    for i in range(inp.steps):
        await ctx.step(f"s{i}", _identity, i)
    return {"steps": inp.steps}


async def events(ctx: RunContext, inp: EventsInput) -> dict[str, int]:
    """N ``run.progress`` events and nothing else: the cost of an append to the run's stream."""
    for i in range(inp.events):
        await ctx.emit("run.progress", {"done": i + 1, "of": inp.events})
    return {"events": inp.events}


def register(registry: WorkflowRegistry) -> None:
    registry.workflow("echo", EchoInput)(echo)
    registry.workflow("demo", DemoInput)(demo)
    registry.workflow("sleep", SleepInput)(sleep)
    registry.workflow("steps", StepsInput)(steps)
    registry.workflow("events", EventsInput)(events)

"""Evolve's programs run no tools: the runtime must not prepare (or collect) sandboxes for them,
or a large population would fill the sandbox pool that agent runs need."""

from __future__ import annotations

import asyncio

from scheduler.backends.base import GenerateRequest
from scheduler.backends.sglang import SGLangBackend
from scheduler.runtime import ProgramRuntime
from tests.servers import SimServerProcess


async def test_sandbox_false_prepares_no_sandbox_and_default_still_does():
    sim = SimServerProcess("--speed", "100").start()
    prepared: list[str] = []
    collected: list[str] = []

    async def prepare(pid: str) -> None:
        prepared.append(pid)

    async def collect(pid: str) -> None:
        collected.append(pid)

    runtime = ProgramRuntime({"sim": SGLangBackend(sim.url)}, on_prepare_sandbox=prepare, on_collect_sandbox=collect)
    await runtime.start()
    try:
        for pid, sandbox in (("evolve-like", False), ("agent-like", True)):
            async for _ in runtime.stream(pid, "t", GenerateRequest(prompt="hello", max_tokens=4), sandbox=sandbox):
                pass
            runtime.release(pid, "t")

        await asyncio.sleep(0.05)  # hooks run as tasks
        assert prepared == ["agent-like"] and collected == ["agent-like"]
    finally:
        await runtime.close()
        for b in runtime.backends.values():
            await b.close()
        sim.kill()

"""Gateway programs whose agent never releases them are released once idle; nothing else is.

Against the simulator's SGLang-compatible server in its own process, on a clock the test moves."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import pytest

from scheduler.backends.base import Backend, Capacity, GenerateRequest, GenerationChunk, Load, Usage
from scheduler.backends.sglang import SGLangBackend
from scheduler.runtime import ProgramRuntime
from tests.servers import SimServerProcess


@pytest.mark.slow
async def test_idle_gateway_programs_are_released_and_busy_or_internal_ones_are_not():
    sim = SimServerProcess("--speed", "100").start()
    collected: list[str] = []

    async def collect(pid: str) -> None:
        collected.append(pid)

    now = [0.0]
    runtime = ProgramRuntime({"sim": SGLangBackend(sim.url)}, idle_release_s=10.0, on_collect_sandbox=collect,
                             observe_interval_s=60, clock=lambda: now[0])
    await runtime.start()

    async def call(pid: str, **kw: object) -> None:
        async for _ in runtime.stream(pid, "t", GenerateRequest(prompt=f"hello {pid}", max_tokens=4)):
            pass

    try:
        runtime.claim("gw-idle", "t", idle_release=True, sandbox=True)  # its sandbox is collected with it
        await call("gw-idle")
        await call("run-internal")  # a run's program: its run releases it
        runtime.claim("gw-busy", "t", idle_release=True, sandbox=True)
        busy = runtime.stream("gw-busy", "t", GenerateRequest(prompt="a long answer", max_tokens=400))
        await anext(busy)  # in flight, and held there
        runtime.claim("gw-hinted", "t", idle_release=True, sandbox=True)
        await call("gw-hinted")

        now[0] = 8.0
        runtime.tool_started("gw-hinted", "t", "browser")  # a hint is activity too
        now[0] = 15.0
        await runtime._release_idle()
        await asyncio.sleep(0.05)  # hooks run as tasks
        assert sorted(p["id"] for p in runtime.programs("t")) == ["gw-busy", "gw-hinted", "run-internal"]
        assert collected == ["gw-idle"] and runtime.stats.idle_released == 1

        async for _ in busy:  # its call ends at 15: idle from then on
            pass
        now[0] = 20.0
        await runtime._release_idle()
        assert "gw-busy" in {p["id"] for p in runtime.programs("t")}
        now[0] = 30.0
        await runtime._release_idle()
        await asyncio.sleep(0.05)
        assert [p["id"] for p in runtime.programs("t")] == ["run-internal"]
        assert sorted(collected) == ["gw-busy", "gw-hinted", "gw-idle"] and runtime.stats.idle_released == 3

        # the id is free again: a later call starts a new program (another tenant may even take it)
        runtime.claim("gw-idle", "other", idle_release=True)
        async for _ in runtime.stream("gw-idle", "other", GenerateRequest(prompt="again", max_tokens=4)):
            pass
        assert [(p["id"], p["requests"]) for p in runtime.programs("other")] == [("gw-idle", 1)]
    finally:
        await runtime.close()
        for b in runtime.backends.values():
            await b.close()
        sim.kill()


async def test_no_idle_release_unless_configured():
    for idle, loops in ((None, ["observe", "tick"]), (0, ["observe", "tick"]), (5.0, ["observe", "tick", "idle-release"])):
        runtime = ProgramRuntime({"down": SGLangBackend("http://127.0.0.1:9")}, observe_interval_s=60,
                                 idle_release_s=idle)
        await runtime.start()  # the backend is down: observed as unhealthy, nothing else
        try:
            runtime.claim("gw", "t", idle_release=True)
            assert [t.get_name() for t in runtime._tasks] == loops
            assert list(runtime._last_active) == (["gw"] if idle else [])
        finally:
            await runtime.close()
            for b in runtime.backends.values():
                await b.close()


class _Gated(Backend):
    """Streams one chunk, then waits for ``gate`` before the final one: a call the test holds open."""

    name = "gated"

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        yield GenerationChunk(rid=request.rid, text="x")
        await self.gate.wait()
        yield GenerationChunk(rid=request.rid, text="", finish_reason="stop",
                              usage=Usage(prompt_tokens=6000, completion_tokens=1, cached_tokens=0))

    async def abort(self, rid: str) -> bool:
        return True

    async def capacity(self) -> Capacity:
        return Capacity(max_total_tokens=10_000)

    async def load(self) -> Load:
        return Load()

    async def health(self) -> bool:
        return True


async def test_a_call_given_up_while_held_and_a_long_call_are_both_judged_right():
    """A client that leaves while its call is held leaves its program idle (released later); a
    call longer than the limit keeps its program until the caller has closed it."""
    now = [0.0]
    backend = _Gated()
    runtime = ProgramRuntime({"gated": backend}, idle_release_s=10.0, observe_interval_s=600, clock=lambda: now[0])
    await runtime.start()
    prompt = "y" * 24_000  # ~6,000 tokens: two do not fit in 10,000
    try:
        runtime.claim("long", "t", idle_release=True)
        long = runtime.stream("long", "t", GenerateRequest(prompt=prompt, max_tokens=50))
        await anext(long)
        runtime.claim("gone", "t", idle_release=True)

        async def call_gone() -> None:
            async for _ in runtime.stream("gone", "t", GenerateRequest(prompt=prompt, max_tokens=50)):
                pass

        task = asyncio.ensure_future(call_gone())
        await asyncio.sleep(0.01)
        assert [r.rid for r in runtime.sched.programs["gone"].pending]  # held: no room
        task.cancel()  # its client went away
        with pytest.raises(asyncio.CancelledError):
            await task

        now[0] = 30.0  # "long" has run for 30 s, past the limit: still open, so kept
        await runtime._release_idle()
        assert sorted(p["id"] for p in runtime.programs("t")) == ["long"]
        backend.gate.set()
        final = await anext(long)  # the engine is done; the caller has not closed the call yet
        assert final.finish_reason == "stop"
        await runtime._release_idle()
        assert [p["id"] for p in runtime.programs("t")] == ["long"]
        with pytest.raises(StopAsyncIteration):
            await anext(long)
        now[0] = 35.0
        await runtime._release_idle()
        assert [p["id"] for p in runtime.programs("t")] == ["long"]  # idle since 30
        now[0] = 41.0
        await runtime._release_idle()
        assert runtime.programs("t") == [] and runtime.stats.idle_released == 2
        assert all(b.inflight == 0 for b in runtime.sched.backends.values())
    finally:
        await runtime.close()

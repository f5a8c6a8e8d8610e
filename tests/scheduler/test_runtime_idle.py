"""Gateway programs whose agent never releases them are released once idle; nothing else is.

Against the simulator's SGLang-compatible server in its own process, on a clock the test moves."""

from __future__ import annotations

import asyncio

from scheduler.backends.base import GenerateRequest
from scheduler.backends.sglang import SGLangBackend
from scheduler.runtime import ProgramRuntime
from tests.servers import SimServerProcess


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
        runtime.claim("gw-idle", "t", idle_release=True)
        await call("gw-idle")
        await call("run-internal")  # a run's program: its run releases it
        runtime.claim("gw-busy", "t", idle_release=True)
        busy = runtime.stream("gw-busy", "t", GenerateRequest(prompt="a long answer", max_tokens=400))
        await anext(busy)  # in flight, and held there
        runtime.claim("gw-hinted", "t", idle_release=True)
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

"""The program session (``scheduler.session``): the one protocol workflows use for a program.

Against the simulator's SGLang-compatible app over real HTTP: behind a wrapper that refuses
the first calls with 503 (the retry policy), or in its own process (claim, release, sandbox)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.responses import JSONResponse

from scheduler.backends.base import GenerateRequest
from scheduler.backends.sglang import SGLangBackend
from scheduler.runtime import ProgramRuntime
from scheduler.session import CallFailed, ProgramInUse, ProgramSession, RetryPolicy
from scheduler.sim.cost import preset
from scheduler.sim.engine import EngineConfig
from scheduler.sim.server import create_app
from tests.servers import SimServerProcess, serve_app

FAST = RetryPolicy(retries=2, base_delay_s=0.01)
GENERATE_PATHS = {"/generate", "/v1/chat/completions", "/v1/completions"}


class Refusing:
    """The simulator's app, answering ``status`` to its first ``refuse`` generation calls."""

    def __init__(self, app: Any, refuse: int, status: int = 503) -> None:
        self.app, self.refuse, self.status, self.calls = app, refuse, status, 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in GENERATE_PATHS:
            self.calls += 1
            if self.calls <= self.refuse:
                await JSONResponse({"error": {"message": "refused"}}, status_code=self.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def sim_app(refuse: int, status: int = 503) -> Refusing:
    return Refusing(create_app(EngineConfig(cost=preset("smollm2-135m-cpu")), speed=200), refuse, status)


def chat(text: str) -> GenerateRequest:
    return GenerateRequest(messages=[{"role": "user", "content": text}], max_tokens=6)


async def runtime_on(url: str) -> ProgramRuntime:
    runtime = ProgramRuntime({"sim": SGLangBackend(url)}, observe_interval_s=60)
    await runtime.start()
    return runtime


async def close(runtime: ProgramRuntime) -> None:
    await runtime.close()
    for b in runtime.backends.values():
        await b.close()


async def test_a_call_refused_before_any_output_is_sent_again_and_the_policy_has_a_limit() -> None:
    app = sim_app(refuse=2)
    async with serve_app(app) as url:
        runtime = await runtime_on(url)
        try:
            async with ProgramSession(runtime, "p", "t", retry=FAST) as session:
                request = chat("hello")
                gen = await session.generate(request)
                assert gen.text and app.calls == 3  # two refusals, then the answer
                assert runtime.stats.backend_failures == {"sim": 2}  # the only backend: not marked down
                app.refuse, app.calls = 10, 0
                with pytest.raises(CallFailed) as err:
                    await session.generate(chat("again"))
                assert app.calls == 3 and err.value.retryable and err.value.status == 503
                assert "BackendHTTPError" in str(err.value)
            assert runtime.programs("t") == []  # released on leaving the block
        finally:
            await close(runtime)


async def test_a_request_the_backend_refuses_as_bad_is_not_sent_again() -> None:
    app = sim_app(refuse=1, status=400)
    async with serve_app(app) as url:
        runtime = await runtime_on(url)
        try:
            async with ProgramSession(runtime, "p", "t", retry=FAST) as session:
                with pytest.raises(CallFailed) as err:
                    await session.generate(chat("hello"))
                assert not err.value.retryable and err.value.status == 400 and app.calls == 1
        finally:
            await close(runtime)


@pytest.mark.slow
@pytest.mark.slow
async def test_the_session_releases_on_error_and_cancel_and_refuses_another_tenant_s_id() -> None:
    sim = SimServerProcess("--speed", "20").start()
    runtime = await runtime_on(sim.url)
    try:
        with pytest.raises(RuntimeError, match="the workflow failed"):
            async with ProgramSession(runtime, "p1", "alpha") as session:
                await session.generate(chat("first"))
                assert [p["id"] for p in runtime.programs("alpha")] == ["p1"]
                with pytest.raises(ProgramInUse):
                    async with ProgramSession(runtime, "p1", "beta"):
                        pass
                raise RuntimeError("the workflow failed")
        assert runtime.programs("alpha") == [] and "p1" not in runtime.owners

        streaming = asyncio.Event()

        async def long_call() -> None:
            async with ProgramSession(runtime, "p2", "alpha") as session:
                async for _ in session.stream(GenerateRequest(prompt="go on", max_tokens=1000)):
                    streaming.set()

        task = asyncio.create_task(long_call())
        await asyncio.wait_for(streaming.wait(), 30)
        assert "p2" in runtime.sched.programs
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert "p2" not in runtime.sched.programs and "p2" not in runtime.owners
    finally:
        await close(runtime)
        sim.kill()


@pytest.mark.slow
@pytest.mark.slow
async def test_only_a_program_that_declared_a_sandbox_gets_one_prepared_and_collected() -> None:
    """Gateway calls, pipelines and evolve run no tools: preparing a sandbox for each of their
    programs (with Kubernetes, a pod) would be waste, and would fill the pool agent runs need."""
    sim = SimServerProcess("--speed", "100").start()
    prepared: list[str] = []
    collected: list[str] = []

    async def prepare(pid: str) -> None:
        prepared.append(pid)

    async def collect(pid: str) -> None:
        collected.append(pid)

    runtime = ProgramRuntime({"sim": SGLangBackend(sim.url)}, on_prepare_sandbox=prepare,
                             on_collect_sandbox=collect)
    await runtime.start()
    try:
        for pid, sandbox in (("no-tools", False), ("agent-like", True)):
            async with ProgramSession(runtime, pid, "t", sandbox=sandbox) as session:
                await session.generate(GenerateRequest(prompt="hello", max_tokens=4))
                session.tool_started("python")
                session.tool_ended()
        runtime.claim("gateway-like", "t", idle_release=True)  # what the gateway does per call
        async for _ in runtime.stream("gateway-like", "t", GenerateRequest(prompt="hi", max_tokens=4)):
            pass
        runtime.release("gateway-like", "t")
        await asyncio.sleep(0.05)  # hooks run as tasks
        assert prepared == ["agent-like"] and collected == ["agent-like"]
    finally:
        await close(runtime)
        sim.kill()

"""The runtime against simulator servers in their own processes, one of them killed.

A program's call placed on a backend that dies before answering is placed again by the core
on a healthy one, and the caller sees one clean reply; the dead backend's programs lose their
placement; once the backend answers again the next observation brings it back. A stream cut
after output is not repeated (the caller has seen tokens), and a 4xx is never retried."""

from __future__ import annotations

import asyncio

import pytest

from scheduler.backends import BackendUnavailable, GenerateRequest, StreamInterrupted
from scheduler.backends.sglang import SGLangBackend
from scheduler.core import Status
from scheduler.runtime import NoBackendAvailable, ProgramRuntime
from tests.servers import SimServerProcess


def chat(text: str, max_tokens: int = 8) -> GenerateRequest:
    return GenerateRequest(messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
                           extra_body={"ignore_eos": True})


async def call(runtime: ProgramRuntime, program: str, request: GenerateRequest) -> str:
    return "".join([c.text async for c in runtime.stream(program, "t", request)])


@pytest.fixture
def servers():
    procs = [SimServerProcess("--speed", "200").start(), SimServerProcess("--speed", "200").start()]
    yield procs
    for p in procs:
        p.kill()


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["program", "request"])
async def test_a_call_on_a_dead_backend_is_placed_again_and_answered(servers, policy: str) -> None:
    a, b = servers
    runtime = ProgramRuntime({"a": SGLangBackend(a.url, read_timeout=5), "b": SGLangBackend(b.url, read_timeout=5)},
                             policy=policy, observe_interval_s=60)
    await runtime.start()
    try:
        # one program on each backend (the core places them; find out where)
        await call(runtime, "p1", chat("first program"))
        await call(runtime, "p2", chat("second program"))
        placed = {pid: runtime.sched.programs[pid].backend for pid in ("p1", "p2")}
        victim = placed["p1"]
        (a if victim == "a" else b).kill()
        text = await call(runtime, "p1", chat("first program, second turn"))
        assert text, "the call was answered"
        p1 = runtime.sched.programs["p1"]
        assert p1.backend != victim and p1.status is Status.ACTIVE
        assert not runtime.sched.backends[victim].healthy
        assert runtime.stats.calls_placed_again == 1 and runtime.stats.backend_failures == {victim: 1}
        assert all(q.backend != victim for q in runtime.sched.programs.values() if q.status is Status.ACTIVE)
        # the same reply as a healthy server gives: replies depend on the prompt, not the server
        survivor = SGLangBackend((b if victim == "a" else a).url)
        direct = await survivor.generate(chat("first program, second turn"))
        assert text == direct.text
        await survivor.close()
        # the backend comes back on the same port: the next observation makes it healthy again
        back = SimServerProcess("--speed", "200", port=(a if victim == "a" else b).port).start()
        servers.append(back)
        await runtime.observe()
        assert runtime.sched.backends[victim].healthy
    finally:
        await runtime.close()


@pytest.mark.slow
async def test_no_second_try_after_output_and_the_only_backend_is_judged_by_observation() -> None:
    # slow enough that the answer is still streaming when the server dies (at speed 200 the
    # whole answer took ~25 ms, and a busy machine could kill it only after the end)
    a = SimServerProcess("--speed", "5").start()
    runtime = ProgramRuntime({"a": SGLangBackend(a.url, read_timeout=5)}, observe_interval_s=60)
    await runtime.start()
    try:
        stream = runtime.stream("p", "t", chat("a long answer", max_tokens=400))
        first = await anext(stream)
        assert first.text
        a.kill()
        with pytest.raises(StreamInterrupted):
            async for _ in stream:
                pass
        # one failed call does not take the only backend down (a transient failure would refuse
        # every call until the next observation): the next call is tried, and fails as it is
        assert runtime.sched.backends["a"].healthy and runtime.stats.backend_failures == {"a": 1}
        with pytest.raises(BackendUnavailable) as err:
            await call(runtime, "q", chat("anyone there?"))
        assert not isinstance(err.value, NoBackendAvailable)  # it was tried
        # the observation finds it dead: from then on a call fails at once, clearly
        await runtime.observe()
        assert not runtime.sched.backends["a"].healthy
        with pytest.raises(NoBackendAvailable, match="no healthy backend"):
            await call(runtime, "r", chat("anyone there?"))
    finally:
        await runtime.close()
        a.kill()


async def test_a_4xx_is_the_request_s_fault_not_retried_and_the_backend_stays_up() -> None:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from scheduler.backends import BackendHTTPError
    from tests.backends.test_failures import serve

    calls = {"n": 0}
    app = FastAPI()

    @app.get("/get_server_info")
    async def info() -> dict:
        return {"max_total_num_tokens": 10_000}

    @app.get("/v1/loads")
    async def loads() -> dict:
        return {"loads": [{"num_running_reqs": 0, "num_waiting_reqs": 0, "num_used_tokens": 0}]}

    @app.post("/v1/chat/completions")
    async def refuse(body: dict) -> JSONResponse:
        calls["n"] += 1
        return JSONResponse({"error": {"message": "max_tokens too large"}}, status_code=400)

    async with serve(app) as url_a, serve(app) as url_b:
        runtime = ProgramRuntime({"a": SGLangBackend(url_a), "b": SGLangBackend(url_b)}, observe_interval_s=60)
        await runtime.start()
        try:
            with pytest.raises(BackendHTTPError) as err:
                await call(runtime, "p", chat("hi"))
            assert err.value.status == 400 and calls["n"] == 1
            assert all(b.healthy for b in runtime.sched.backends.values())
        finally:
            await runtime.close()

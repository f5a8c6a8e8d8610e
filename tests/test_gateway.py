"""The OpenAI-compatible gateway with the real ``openai`` client, against the service on
loopback whose backend is the simulator's SGLang-compatible server in its own process."""

from __future__ import annotations

import asyncio
from pathlib import Path
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from orchestrator import Settings
from tests.servers import SimServerProcess, free_port, running_server

pytestmark = pytest.mark.slow

KEYS = {"sk-a": "alpha", "sk-b": "beta"}
TOOLS = [{"type": "function", "function": {"name": "run_tests", "parameters": {"type": "object", "properties": {}}}}]


def aborted(metrics: str) -> float:
    """The engine's aborted-requests counter from its /metrics text."""
    line = next(x for x in metrics.splitlines() if x.startswith("sglang:num_aborted_requests_total"))
    return float(line.split()[-1])


@pytest.fixture(scope="module")
def sim() -> AsyncIterator[SimServerProcess]:
    proc = SimServerProcess("--speed", "20").start()
    yield proc
    proc.kill()


@pytest.fixture
async def service(sim: SimServerProcess, tmp_path: Path) -> AsyncIterator[str]:
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/gw.db", api_keys=KEYS, worker_enabled=False,
                        log_json=False, backends=[{"name": "sim-0", "kind": "sglang", "url": sim.url}])
    async with running_server(settings) as url:
        yield url


async def test_openai_client_drop_in_with_program_lifecycle(service: str):
    client = AsyncOpenAI(base_url=f"{service}/v1", api_key="sk-a")
    ask = [{"role": "system", "content": "You are a coding agent."}, {"role": "user", "content": "Fix the bug."}]
    # turn 1: the answer calls a tool, so the program is acting until its next request
    r1 = await client.chat.completions.create(model="m", messages=ask, tools=TOOLS, tool_choice="required",
                                              max_tokens=32, extra_body={"program_id": "agent-1"})
    call = r1.choices[0].message.tool_calls[0]
    assert r1.choices[0].finish_reason == "tool_calls" and call.function.name == "run_tests"
    async with httpx.AsyncClient(base_url=service, headers={"Authorization": "Bearer sk-a"}) as http:
        progs = (await http.get("/v1/programs")).json()["data"]
        assert [(p["id"], p["phase"], p["status"], p["backend"]) for p in progs] == \
            [("agent-1", "acting", "active", "sim-0")]
        # turn 2, streamed, program id in a header: its earlier turn is a cached prefix
        follow = ask + [r1.choices[0].message.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": call.id, "content": "1 failed"}]
        stream = await client.chat.completions.create(
            model="m", messages=follow, max_tokens=24, stream=True, stream_options={"include_usage": True},
            extra_headers={"X-Program-Id": "agent-1"})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            usage = chunk.usage or usage
        assert text and usage.prompt_tokens_details.cached_tokens > 0
        metrics = (await http.get("/metrics")).text
        assert 'orchestrator_programs{phase="reasoning",status="active"} 1.0' in metrics
        assert "orchestrator_scheduler_dispatches_total 2.0" in metrics
        assert 'orchestrator_backend_healthy{backend="sim-0"} 1.0' in metrics
        # a gateway program declares no sandbox: none was prepared for its calls (a pod each, on Kubernetes)
        assert all(f'orchestrator_sandboxes{{state="{st}"}} 0.0' in metrics for st in ("creating", "ready", "failed"))
        hit = float(metrics.split("\norchestrator_scheduler_kv_hit_ratio ")[1].split()[0])
        assert 0 < hit < 1
        prog = (await http.get("/v1/programs/agent-1")).json()
        assert prog["phase"] == "reasoning" and prog["steps"] == 1 and prog["requests"] == 2
        # another tenant can neither reuse nor see nor release it
        other = AsyncOpenAI(base_url=f"{service}/v1", api_key="sk-b")
        with pytest.raises(openai.ConflictError) as conflict:
            await other.chat.completions.create(model="m", messages=ask, extra_body={"program_id": "agent-1"})
        assert conflict.value.body["code"] == "program_id_conflict"
        beta = {"Authorization": "Bearer sk-b"}
        assert (await http.get("/v1/programs", headers=beta)).json()["data"] == []
        assert (await http.post("/v1/programs/agent-1/release", headers=beta)).status_code == 404
        # release: gone; a second release is a clear 404
        assert (await http.post("/v1/programs/agent-1/release")).json()["released"] is True
        assert (await http.get("/v1/programs")).json()["data"] == []
        again = await http.post("/v1/programs/agent-1/release")
        assert again.status_code == 404 and again.json()["error"]["code"] == "program_not_found"


async def test_requests_without_program_id_and_tool_hints(service: str):
    client = AsyncOpenAI(base_url=f"{service}/v1", api_key="sk-a")
    r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert r.choices[0].message.content and r.usage.completion_tokens > 0
    async with httpx.AsyncClient(base_url=service, headers={"Authorization": "Bearer sk-a"}) as http:
        assert (await http.get("/v1/programs")).json()["data"] == []  # its own one-turn program, released
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "go"}], max_tokens=8,
                                             extra_body={"program_id": "hinted"})
        hint = await http.post("/v1/programs/hinted/tool", json={"phase": "acting", "tool": "browser"})
        assert hint.status_code == 200
        assert (await http.get("/v1/programs/hinted")).json()["tool"] == "browser"
        assert (await http.post("/v1/programs/hinted/tool", json={"phase": "reasoning"})).status_code == 200
        assert (await http.get("/v1/programs/hinted")).json()["steps"] == 1
        bad = await http.post("/v1/programs/nope/tool", json={"phase": "acting"})
        assert bad.status_code == 404
        bad = await http.post("/v1/programs/hinted/tool", json={"phase": "sleeping"})
        assert bad.status_code == 422 and "error" in bad.json()


@pytest.mark.parametrize("messages, param", [
    ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
    ([{"role": "tool", "content": "x", "tool_call_id": "c9"}], "messages[0].tool_call_id"),
    ([{"role": "assistant", "tool_calls": [{"id": "c1", "function": {"arguments": "{}"}}]}],
     "messages[0].tool_calls[0]"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role"),
    ([], "messages"),
])
async def test_malformed_messages_get_a_400(service: str, messages: list, param: str):
    async with httpx.AsyncClient(base_url=service, headers={"Authorization": "Bearer sk-a"}) as http:
        r = await http.post("/v1/chat/completions", json={"model": "m", "messages": messages, "program_id": "p"})
        assert r.status_code == 422 and r.json()["error"]["param"] == param
        assert (await http.get("/v1/programs")).json()["data"] == []  # nothing half-written


async def test_backend_down_is_503_and_no_backends_is_503(tmp_path: Path):
    dead = f"http://127.0.0.1:{free_port()}"
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/d.db", api_keys=KEYS, worker_enabled=False,
                        log_json=False, backends=[{"name": "dead", "url": dead}])
    async with running_server(settings) as url:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer sk-a"}, timeout=30) as http:
            r = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/n.db", api_keys=KEYS, worker_enabled=False,
                        log_json=False)
    async with running_server(settings) as url:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer sk-a"}) as http:
            r = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 503 and r.json()["error"]["code"] == "no_backends"


async def test_the_fast_route_keeps_the_api_s_errors_docs_metrics_and_aborts_on_disconnect(
        service: str, sim: SimServerProcess):
    """``/v1/chat/completions`` is a plain ASGI route ahead of FastAPI: the same error bodies,
    its OpenAPI entry, its HTTP metrics label, and a client that leaves a stream aborts the call
    on the engine."""
    async with httpx.AsyncClient(base_url=service, headers={"Authorization": "Bearer sk-a"}, timeout=30) as http:
        ok = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
        r = await http.post("/v1/chat/completions", content=b"{not json")
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_json"
        r = await http.post("/v1/chat/completions", json=[ok])
        assert r.status_code == 422 and r.json()["error"]["param"] is None and "object" in r.json()["error"]["message"]
        r = await http.post("/v1/chat/completions", json={**ok, "temperature": 9})
        assert r.status_code == 422 and r.json()["error"]["param"] == "temperature"
        r = await http.post("/v1/chat/completions", json=ok, headers={"Authorization": "Bearer sk-wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = await http.post("/v1/chat/completions", json=ok, headers={"X-Program-Id": "p" * 201})
        assert r.status_code == 422 and r.json()["error"]["param"] == "x-program-id"
        assert r.json()["error"]["code"] == "validation_error"
        assert (await http.post("/v1/chat/completions/", json=ok)).status_code == 200  # trailing slash
        r = await http.get("/v1/chat/completions")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        assert r.headers["allow"] == "POST" and r.headers["x-request-id"]
        assert (await http.get("/v1/programs")).json()["data"] == []  # nothing half-written

        spec = (await http.get("/openapi.json")).json()
        op = spec["paths"]["/v1/chat/completions"]["post"]
        assert op["operationId"] == "chat_completions_v1_chat_completions_post"  # as before: generated clients
        assert set(op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        assert "program_id" in spec["components"]["schemas"][ref]["properties"]
        assert "ChatMessage" in spec["components"]["schemas"] and "ErrorBody" in spec["components"]["schemas"]

        async with httpx.AsyncClient(base_url=sim.url) as direct:
            before = aborted((await direct.get("/metrics")).text)
            body = {**ok, "max_tokens": 4000, "stream": True, "program_id": "leaver", "ignore_eos": True}
            async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if line.startswith("data: {"):
                        break  # leave after the first chunk: the connection closes
            for _ in range(400):  # a loaded machine can take seconds to notice the close
                if aborted((await direct.get("/metrics")).text) > before:
                    break
                await asyncio.sleep(0.05)
            assert aborted((await direct.get("/metrics")).text) == before + 1
            loads = (await direct.get("/v1/loads")).json()["loads"][0]
            assert loads["num_running_reqs"] == 0
        prog = (await http.get("/v1/programs/leaver")).json()
        assert prog["status"] == "active"  # kept (it has an id), its aborted call gone from the engine
        metrics = (await http.get("/metrics")).text
        for status in ("200", "401", "422"):
            assert f'orchestrator_http_requests_total{{method="POST",route="/v1/chat/completions",status="{status}"}}' \
                in metrics


async def test_a_client_that_leaves_before_the_answer_aborts_the_call(tmp_path: Path):
    """Not streamed, or streamed but gone before the first token: the call is cancelled, which
    aborts it on the engine, instead of running to its end for nobody."""
    # real time on the CPU preset: a 3,000-token prompt takes ~4.7 s before its first token
    slow = SimServerProcess("--speed", "1", "--preset", "smollm2-135m-cpu").start()
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/gone.db", api_keys=KEYS, worker_enabled=False,
                        log_json=False, backends=[{"name": "slow", "kind": "sglang", "url": slow.url}])
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2000, "ignore_eos": True}
    try:
        async with running_server(settings) as service, httpx.AsyncClient(base_url=slow.url) as direct:
            for stream in (False, True):
                before = aborted((await direct.get("/metrics")).text)
                async with httpx.AsyncClient(base_url=service, headers={"Authorization": "Bearer sk-a"},
                                             timeout=httpx.Timeout(0.5)) as http:
                    with pytest.raises(httpx.ReadTimeout):
                        if stream:  # a long prompt: its first token comes after the client left
                            long = {**body, "messages": [{"role": "user", "content": "word " * 3000}], "stream": True}
                            async with http.stream("POST", "/v1/chat/completions", json=long) as r:
                                await r.aread()
                        else:
                            await http.post("/v1/chat/completions", json=body)
                for _ in range(100):
                    if aborted((await direct.get("/metrics")).text) > before:
                        break
                    await asyncio.sleep(0.05)
                assert aborted((await direct.get("/metrics")).text) == before + 1, stream
                assert (await direct.get("/v1/loads")).json()["loads"][0]["num_running_reqs"] == 0
    finally:
        slow.kill()


async def test_a_program_its_agent_never_releases_is_released_once_idle(sim: SimServerProcess, tmp_path: Path):
    """Most OpenAI clients know nothing of release: after ``ORCH_PROGRAM_IDLE_RELEASE_S`` with
    nothing in flight the program goes, as if released; one that keeps calling stays."""
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/idle.db", api_keys=KEYS, worker_enabled=False,
                        log_json=False, backends=[{"name": "sim-0", "kind": "sglang", "url": sim.url}],
                        program_idle_release_s=3.0)
    async with running_server(settings) as service:
        client = AsyncOpenAI(base_url=f"{service}/v1", api_key="sk-a")
        msgs = [{"role": "user", "content": "Fix the bug."}]
        for pid in ("forgotten", "alive"):
            await client.chat.completions.create(model="m", messages=msgs, tools=TOOLS, tool_choice="required",
                                                 max_tokens=16, extra_body={"program_id": pid})
        async with httpx.AsyncClient(base_url=service, headers={"Authorization": "Bearer sk-a"}) as http:
            ids = [p["id"] for p in (await http.get("/v1/programs")).json()["data"]]
            assert sorted(ids) == ["alive", "forgotten"]
            # "alive" calls every 0.25 s, "forgotten" never again, until "forgotten" is released (at
            # most 40 calls). Idle means 3 s with nothing in flight, not 1 s: a loaded machine that
            # stalls this loop for a second must not make "alive" idle too (CI saw that once).
            for _ in range(40):
                await asyncio.sleep(0.25)
                await client.chat.completions.create(model="m", messages=msgs, max_tokens=2,
                                                     extra_body={"program_id": "alive"})
                ids = [p["id"] for p in (await http.get("/v1/programs")).json()["data"]]
                if ids == ["alive"]:
                    break
            assert ids == ["alive"]
            metrics = (await http.get("/metrics")).text
            assert "orchestrator_scheduler_programs_idle_released_total 1.0" in metrics
            gone = await http.post("/v1/programs/forgotten/release")
            assert gone.status_code == 404 and gone.json()["error"]["code"] == "program_not_found"


async def test_a_request_the_backend_refuses_is_a_400_with_its_reason(tmp_path: Path):
    """A prompt longer than the engine's context is the caller's fault: the engine's 400 comes back
    as a 400 naming it (streamed or not), not as a 503 that tells the agent to retry; the backend
    stays in service for the next call."""
    small = SimServerProcess("--speed", "20", "--capacity-tokens", "2048").start()
    try:
        settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/r.db", api_keys=KEYS,
                            worker_enabled=False, log_json=False,
                            backends=[{"name": "small", "kind": "sglang", "url": small.url}])
        async with running_server(settings) as url:
            async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer sk-a"}, timeout=60) as http:
                too_long = [{"role": "user", "content": "lorem ipsum dolor " * 3000}]
                for stream in (False, True):
                    r = await http.post("/v1/chat/completions", json={"messages": too_long, "max_tokens": 8,
                                                                      "stream": stream, "program_id": "p-long"})
                    err = r.json()["error"]
                    assert r.status_code == 400, r.text
                    assert err["code"] == "backend_rejected_request" and "context length" in err["message"]
                    assert r.headers["x-request-id"]
                ok = await http.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "program_id": "p-long"})
                assert ok.status_code == 200, ok.text
    finally:
        small.kill()


async def test_a_streamed_tool_call_reads_back_with_the_clients_stream_helper(service: str):
    """The gateway's events (``scheduler.backends.openai_wire``) as the ``openai`` client's own
    stream helper assembles them: the role, the tool call by its index, the finish reason, usage."""
    client = AsyncOpenAI(base_url=f"{service}/v1", api_key="sk-a")
    strict = [{"type": "function", "function": {**TOOLS[0]["function"], "strict": True}}]
    async with client.chat.completions.stream(
            model="m", messages=[{"role": "user", "content": "Fix the bug."}], tools=strict, tool_choice="required",
            max_tokens=32, stream_options={"include_usage": True}) as stream:
        final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "tool_calls"
    assert [c.function.name for c in choice.message.tool_calls or []] == ["run_tests"]
    assert final.usage is not None and final.usage.completion_tokens > 0

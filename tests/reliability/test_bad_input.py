"""Issue 16, bad input: each case answers a 4xx with the documented error body and
``x-request-id`` (never a 500, a hang or a half-written row), on SQLite and on PostgreSQL + Redis
where the database or the bus is involved."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from typing import Any, AsyncIterator

import httpx
import pytest

from orchestrator.db.models import INT32_MAX
from orchestrator.logs import JSONFormatter
from orchestrator.runs.store import RunStore
from tests.servers import running_server, running_sim
from tests.test_bad_input import A, assert_error, count_rows

JSON = {**A, "content-type": "application/json"}
SSE = {**A, "Accept": "text/event-stream"}


@pytest.fixture
async def env(make_settings: Any) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    settings = make_settings()
    async with running_server(settings) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            yield c, settings.database_url


async def finished_run(c: httpx.AsyncClient) -> dict[str, Any]:
    run = (await c.post("/v1/runs", json={"workflow": "echo", "input": {"message": 1}}, headers=A)).json()
    run = (await c.get(f"/v1/runs/{run['id']}", params={"wait": 10}, headers=A)).json()
    assert run["status"] == "succeeded"
    return run


async def sse_body(c: httpx.AsyncClient, path: str, headers: dict[str, str], within: float = 8.0) -> str:
    """The whole SSE response; fails if the stream is still open after ``within`` seconds."""
    async def read() -> str:
        async with c.stream("GET", path, headers=headers) as r:
            assert r.status_code == 200, await r.aread()
            return "".join([chunk async for chunk in r.aiter_text()])

    return await asyncio.wait_for(read(), within)


async def test_lone_surrogates_are_refused_before_anything_is_written(env):
    """Was: 500, the run stored anyway, and every later GET /v1/runs of the tenant 500 for good."""
    c, db = env
    bodies = [
        b'{"workflow": "echo", "input": {"message": "\\ud800"}}',
        b'{"workflow": "echo", "input": {"message": 1}, "metadata": {"k": "a\\udfffb"}}',
        b'{"workflow": "echo", "input": {"message": 1}, "metadata": {"\\ud800": 1}}',
        b'{"workflow": "\\ud800"}',
        '{"workflow": "echo", "input": {"message": "\ud800"}}'.encode("utf-8", "surrogatepass"),  # raw bytes
    ]
    for body in bodies:
        assert_error(await c.post("/v1/runs", content=body, headers=JSON), 400, "invalid_json")
    assert await count_rows(db) == (0, 0)
    assert (await c.get("/v1/runs", headers=A)).status_code == 200
    # the gateway's chat bodies too (refused before any backend is needed)
    chat = b'{"messages": [{"role": "user", "content": "\\ud800"}]}'
    assert_error(await c.post("/v1/chat/completions", content=chat, headers=JSON), 422, "invalid_json")


async def test_nan_infinity_and_numbers_beyond_a_double_are_refused(env):
    """Was: 500 on PostgreSQL (its json refuses them); SQLite stored null instead."""
    c, db = env
    for number in (b"NaN", b"Infinity", b"-Infinity"):
        body = b'{"workflow": "echo", "input": {"message": %s}}' % number
        assert_error(await c.post("/v1/runs", content=body, headers=JSON), 400, "invalid_json")
    for body, param in [(b'{"workflow": "echo", "input": {"message": 1e400}}', "input.message"),
                        (b'{"workflow": "echo", "input": {"message": [0, -1e400]}}', "input.message[1]"),
                        (b'{"workflow": "echo", "input": {"message": 1}, "metadata": {"x": 1e999}}', "metadata.x")]:
        assert_error(await c.post("/v1/runs", content=body, headers=JSON), 422, "unsupported_value", param)
    assert await count_rows(db) == (0, 0)
    chat = b'{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": 1e400}}'
    assert_error(await c.post("/v1/chat/completions", content=chat, headers=JSON), 422, "unsupported_value",
                 "logit_bias.1")


async def test_nul_in_stored_strings_and_in_query_parameters_is_refused(env):
    """PostgreSQL text cannot hold NUL: a query parameter holding one failed there as a 500."""
    c, db = env
    for body, param in [({"workflow": "echo", "input": {"message": "a\x00b"}}, "input.message"),
                        ({"workflow": "echo", "input": {"message": {"k\x00": 1}}}, "input.message"),
                        ({"workflow": "echo", "input": {"message": 1}, "metadata": {"m": ["\x00"]}}, "metadata.m[0]")]:
        assert_error(await c.post("/v1/runs", json=body, headers=A), 422, "unsupported_value", param)
    assert await count_rows(db) == (0, 0)
    assert_error(await c.get("/v1/runs", params={"workflow": "ec\x00ho"}, headers=A), 422, "unsupported_value",
                 "workflow")
    assert_error(await c.get("/v1/runs", params={"status": "queued\x00"}, headers=A), 422, "unsupported_value",
                 "status")


async def test_event_cursors_beyond_the_seq_column_are_refused(env):
    """``seq`` is a 32-bit integer on PostgreSQL (64-bit on SQLite): beyond, the page was a 500
    and the SSE stream broke after its 200 (or, within SQLite's range, never ended)."""
    c, _ = env
    run = await finished_run(c)
    events = f"/v1/runs/{run['id']}/events"
    for too_big in (INT32_MAX + 1, 2**63, 2**64):
        assert_error(await c.get(events, params={"starting_after": too_big}, headers=A), 422, "validation_error",
                     "starting_after")
        for headers in (A, SSE):
            assert_error(await c.get(events, headers={**headers, "Last-Event-ID": str(too_big)}), 422,
                         "validation_error", "last-event-id")
    page = await c.get(events, params={"starting_after": INT32_MAX}, headers=A)
    assert page.status_code == 200 and page.json()["data"] == []
    assert "id:" not in await sse_body(c, events, {**SSE, "Last-Event-ID": str(INT32_MAX)})


async def test_a_stream_resumed_at_or_past_the_final_event_closes(env):
    """Was: keep-alives for ever, for a finished run and for one finishing behind the resume point."""
    c, _ = env
    run = await finished_run(c)
    events = f"/v1/runs/{run['id']}/events"
    assert "id:" not in await sse_body(c, events, {**SSE, "Last-Event-ID": str(run["last_event_seq"])})
    assert "id:" not in await sse_body(c, events + f"?starting_after={run['last_event_seq'] + 5}", SSE)
    # still running when the stream starts: its final event comes live, numbered below the resume point
    sleeping = (await c.post("/v1/runs", json={"workflow": "sleep", "input": {"seconds": 1}}, headers=A)).json()
    body = await sse_body(c, f"/v1/runs/{sleeping['id']}/events", {**SSE, "Last-Event-ID": "1000"})
    assert "id:" not in body
    assert (await c.get(f"/v1/runs/{sleeping['id']}", headers=A)).json()["status"] == "succeeded"


async def read_until_closed(reader: asyncio.StreamReader, into: list[bytes]) -> bool:
    """Read what the server sends until it closes; True if it closed with a reset. Chunk by chunk,
    so that what came before a reset is kept (``StreamReader.read()`` would raise and lose it)."""
    try:
        while chunk := await reader.read(65536):
            into.append(chunk)
    except ConnectionResetError:
        return True
    return False


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_a_body_shorter_than_its_content_length_times_out(make_settings, backend):
    """Was: the connection (and a task) held for as long as the client liked; uvicorn has no
    body-read timeout. Now 408 after ORCH_BODY_READ_TIMEOUT_S, then the connection is closed,
    also for a body that trickles in."""
    settings = make_settings(body_read_timeout_s=0.5)
    async with running_server(settings) as url:
        port = int(url.rsplit(":", 1)[1])
        for trickle in (False, True):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/runs HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer sk-test-a\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            received: list[bytes] = []
            reading = asyncio.ensure_future(read_until_closed(reader, received))
            while trickle and not reading.done() and not received:  # a byte every 0.1 s: never idle long
                await asyncio.sleep(0.1)
                writer.write(b" ")
            reset = await asyncio.wait_for(reading, 10)
            writer.close()
            raw = b"".join(received)
            if trickle and reset and not raw:
                # The server closed with the client's trickled bytes unread, so its kernel answered
                # with a reset, which can overtake the 408 on loopback: the connection was not held.
                continue
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), raw
            assert b"x-request-id:" in head.lower() and b"connection: close" in head.lower()
            assert json.loads(body)["error"]["code"] == "request_timeout"
        assert await count_rows(settings.database_url) == (0, 0)


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_an_unexpected_error_is_a_500_with_the_request_id_in_header_and_log(make_settings, backend,
                                                                                 monkeypatch):
    """Was: FastAPI's catch-all runs outside every middleware, so its 500 had no x-request-id and
    its log line no request id."""
    async def broken_list(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("induced fault")

    def broken_check(_body: Any) -> None:
        raise RuntimeError("induced fault")

    monkeypatch.setattr(RunStore, "list_runs", broken_list)
    monkeypatch.setattr("orchestrator.api.gateway._check_messages", broken_check)
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JSONFormatter())  # formats at emit time, inside the request
    logger = logging.getLogger("orchestrator.errors")
    logger.addHandler(handler)
    try:
        async with running_server(make_settings()) as url, httpx.AsyncClient(base_url=url) as c:
            chat = {"messages": [{"role": "user", "content": "hi"}]}
            for r in (await c.get("/v1/runs", headers=A), await c.post("/v1/chat/completions", json=chat, headers=A)):
                assert_error(r, 500, "internal_error")
                logged = [json.loads(x) for x in lines.getvalue().splitlines()]
                assert any(x["msg"] == "unhandled error" and x["request_id"] == r.headers["x-request-id"]
                           and "induced fault" in x["exc"] for x in logged)
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_an_unsupported_method_is_a_405_that_allows_every_method_of_the_path(env, backend):
    """Was: no ``Allow`` at all (the error handler dropped it), and Starlette's named only the
    first route matching the path (``POST`` for ``/v1/runs``)."""
    c, _ = env
    for method, path, allow in [("TRACE", "/v1/runs", "GET, POST"), ("DELETE", "/v1/runs", "GET, POST"),
                                ("TRACE", "/metrics", "GET"), ("PUT", "/v1/runs/run_x/cancel", "POST"),
                                ("TRACE", "/v1/chat/completions", "POST")]:
        r = await c.request(method, path, headers=A)
        assert_error(r, 405, "method_not_allowed")
        assert r.headers["allow"] == allow, (method, path)


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize(("ceiling", "bound"), [(4000, "ORCH_MAX_TOKENS_CEILING"), (20_000, "context length")])
async def test_max_tokens_is_bounded_by_the_ceiling_and_the_context_length(make_settings, backend, ceiling, bound):
    """Was: a max_tokens of 2**31 reached the backend, which generated for ever: the call and
    every later one hung. The bound is the lower of the ceiling and the context length the
    backend reports (8191 tokens of input here)."""
    async with running_sim("smollm2-135m-cpu", speed=50) as sim_url:  # SmolLM2's context: 8192 tokens
        settings = make_settings(worker_enabled=False, max_tokens_ceiling=ceiling,
                                 backends=[{"name": "sim-0", "kind": "sglang", "url": sim_url}])
        async with running_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=10) as c:
            async def chat(**extra: Any) -> httpx.Response:
                body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
                return await c.post("/v1/chat/completions", json=body, headers=A)

            for field in ("max_tokens", "max_completion_tokens"):
                for asked in (min(ceiling, 8191) + 1, 2**31):
                    r = await chat(**{field: asked})
                    assert_error(r, 422, "validation_error", field)
                    assert bound in r.json()["error"]["message"]
            assert (await chat(max_tokens=8, stream=True)).status_code == 200
            assert (await chat(max_tokens=8)).status_code == 200

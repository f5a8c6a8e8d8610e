"""The SDK against the live service, including a stream that is cut and resumes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from orchestrator_sdk import (
    AsyncClient,
    AuthenticationError,
    Client,
    ConflictError,
    NotFoundError,
    RateLimitError,
    Run,
    UnprocessableEntityError,
)
from tests.servers import running_server


class CuttingProxy:
    """A loopback TCP proxy that cuts the first ``cuts`` connections after ``cut_after`` bytes
    from the server, like a load balancer dropping a long stream."""

    def __init__(self, upstream_port: int, cut_after: int, cuts: int = 1) -> None:
        self.upstream_port = upstream_port
        self.cut_after = cut_after
        self.cuts_left = cuts
        self.connections = 0
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        cut = self.cuts_left > 0
        self.cuts_left -= cut
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, limit: int | None) -> None:
            sent = 0
            try:
                while data := await src.read(4096):
                    if limit is not None and sent + len(data) >= limit:
                        dst.write(data[: limit - sent])
                        await dst.drain()
                        break
                    dst.write(data)
                    await dst.drain()
                    sent += len(data)
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                for w in (writer, up_writer):
                    w.close()

        await asyncio.gather(pump(reader, up_writer, None), pump(up_reader, writer, self.cut_after if cut else None))

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture
def backend() -> str:  # the SDK is the same on both databases; the API tests cover both
    return "sqlite"


async def test_async_client_end_to_end(make_settings):
    async with running_server(make_settings()) as url:
        async with AsyncClient(base_url=url, api_key="sk-test-a") as client:
            run = await client.runs.create("demo", {"steps": 2, "step_seconds": 0.05}, metadata={"k": "v"})
            assert isinstance(run, Run) and run.status == "queued" and run.metadata == {"k": "v"}
            events = [ev async for ev in client.runs.stream(run.id)]
            assert [e.seq for e in events] == list(range(1, len(events) + 1)) and events[-1].type == "run.succeeded"
            final = await client.runs.wait(run.id, timeout=10)
            assert final.status == "succeeded" and final.output == {"steps": 2, "total": 1}
            assert [s.name for s in await client.runs.steps(run.id)] == ["work-0", "work-1"]
            page = await client.runs.events(run.id, starting_after=2, limit=3)
            assert [e.seq for e in page.data] == [3, 4, 5] and page.has_more
            ids = [(await client.runs.create("echo", {"message": i})).id for i in range(5)]
            listed = [r.id async for r in client.runs.list_all(page_size=2, workflow="echo")]
            assert listed == list(reversed(ids))
            assert {w.name for w in await client.workflows.list()} >= {"echo", "demo", "sleep"}
            sleeper = await client.runs.create("sleep", {"seconds": 60})
            await client.runs.cancel(sleeper.id)
            assert (await client.runs.wait(sleeper.id, timeout=10)).status == "cancelled"


async def test_sync_client_and_typed_errors(make_settings):
    async with running_server(make_settings()) as url:
        def work() -> None:
            with Client(base_url=url, api_key="sk-test-a", max_retries=0) as client:
                run = client.runs.create("echo", {"message": "hi"})
                assert client.runs.wait(run.id, timeout=10).output == "hi"
                assert client.runs.get(run.id).status == "succeeded"
                page = client.runs.list(limit=1)
                assert page.data[0].id == run.id and not page.has_more
                with pytest.raises(NotFoundError) as exc:
                    client.runs.get("run_00000000000000000000000000")
                assert exc.value.status_code == 404 and exc.value.code == "run_not_found" and exc.value.request_id
                with pytest.raises(UnprocessableEntityError) as exc:
                    client.runs.create("no-such-workflow")
                assert exc.value.code == "unknown_workflow" and exc.value.param == "workflow"
                client.runs.create("echo", {"message": 1}, idempotency_key="same")
                with pytest.raises(ConflictError):
                    client.runs.create("echo", {"message": 2}, idempotency_key="same")
            with Client(base_url=url, api_key="wrong") as client:
                with pytest.raises(AuthenticationError):
                    client.runs.list()

        await asyncio.to_thread(work)


async def test_stream_is_cut_and_resumes_without_gap_or_duplicate(make_settings):
    async with running_server(make_settings()) as url:
        port = int(url.rsplit(":", 1)[1])
        proxy = CuttingProxy(port, cut_after=1500, cuts=2)
        proxy_port = await proxy.start()
        try:
            async with AsyncClient(base_url=f"http://127.0.0.1:{proxy_port}", api_key="sk-test-a") as client:
                run = await client.runs.create("demo", {"steps": 6, "step_seconds": 0.1})
                seqs = [ev.seq async for ev in client.runs.stream(run.id)]
                final = await client.runs.get(run.id)
        finally:
            await proxy.stop()
    assert proxy.connections >= 4  # create + first stream (cut) + second (cut) + third
    assert seqs == list(range(1, final.last_event_seq + 1))
    assert final.status == "succeeded"


def test_retries_honour_retry_after_and_reuse_the_idempotency_key():
    seen: list[tuple[float, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((time.monotonic(), request.headers.get("idempotency-key")))
        if len(seen) < 3:
            return httpx.Response(429, headers={"Retry-After": "1"},
                                  json={"error": {"type": "rate_limit_error", "code": "rate_limited",
                                                  "message": "slow down", "param": None}})
        return httpx.Response(201, json={"id": "run_x", "workflow": "echo", "status": "queued", "created_at": 1.0})

    with Client(base_url="http://test", api_key="k", max_retries=2, transport=httpx.MockTransport(handler)) as c:
        run = c.runs.create("echo", {"message": 1})
    assert run.id == "run_x" and len(seen) == 3
    assert len({key for _, key in seen}) == 1 and seen[0][1]
    assert seen[1][0] - seen[0][0] >= 0.95 and seen[2][0] - seen[1][0] >= 0.95

    seen.clear()
    with Client(base_url="http://test", api_key="k", max_retries=1, transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(RateLimitError):
            c.runs.create("echo", {"message": 1})
    assert len(seen) == 2


def test_conflict_is_never_retried():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(409, json={"error": {"type": "conflict_error", "code": "idempotency_key_reused",
                                                   "message": "no", "param": "Idempotency-Key"}})

    with Client(base_url="http://test", api_key="k", max_retries=3, transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(ConflictError):
            c.runs.create("echo")
    assert len(calls) == 1


def test_a_create_retried_after_a_lost_response_makes_one_run(tmp_path):
    """A real server, a connection that dies after the request was sent: the retry with the same
    idempotency key returns the run the first attempt created."""
    from orchestrator import Settings

    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/db.sqlite", api_keys={"sk": "t"},
                        worker_enabled=False)
    result: dict[str, object] = {}

    async def scenario() -> None:
        async with running_server(settings) as url:
            port = int(url.rsplit(":", 1)[1])
            proxy = CuttingProxy(port, cut_after=1, cuts=1)  # the first response is lost after 1 byte
            proxy_port = await proxy.start()

            def create() -> None:
                with Client(base_url=f"http://127.0.0.1:{proxy_port}", api_key="sk", max_retries=3) as c:
                    result["run"] = c.runs.create("echo", {"message": 1})
                    result["all"] = c.runs.list(limit=100).data

            await asyncio.to_thread(create)
            await proxy.stop()

    asyncio.run(scenario())
    assert [r.id for r in result["all"]] == [result["run"].id]  # type: ignore[union-attr]


SERVER_MODULES = ("fastapi", "sqlalchemy", "alembic", "redis", "uvicorn", "starlette", "orchestrator", "scheduler",
                  "tools", "agents", "evolve")


def test_importing_the_sdk_loads_nothing_of_the_server(tmp_path: Path) -> None:
    """``orchestrator_sdk`` is a client: importing it (in a fresh interpreter, outside the repository
    so that no server package is on the path by accident) must not load the server's stack.
    The bound on the module count is httpx + pydantic (~400) with room, far under the ~1,000
    the server drags in."""
    probe = ("import json, sys, orchestrator_sdk\n"
             "print(json.dumps({'count': len(sys.modules), 'top': sorted({m.split('.')[0] for m in sys.modules})}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    assert "orchestrator_sdk" in loaded["top"]
    assert not set(SERVER_MODULES) & set(loaded["top"]), set(SERVER_MODULES) & set(loaded["top"])
    assert loaded["count"] < 600, loaded["count"]

"""Bad input gets a 4xx with the documented error body, and nothing is half-written."""

from __future__ import annotations

import json

import httpx
import pytest
from sqlalchemy import func, select

from orchestrator.db import Run, RunEvent, create_engine
from tests.servers import running_server

A = {"Authorization": "Bearer sk-test-a"}


def assert_error(r: httpx.Response, status: int, code: str, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "code", "message", "param"}
    assert body["error"]["code"] == code and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    assert r.headers.get("x-request-id")


async def count_rows(url: str) -> tuple[int, int]:
    engine = create_engine(url)
    async with engine.connect() as conn:
        runs = await conn.scalar(select(func.count()).select_from(Run))
        events = await conn.scalar(select(func.count()).select_from(RunEvent))
    await engine.dispose()
    return runs, events


@pytest.fixture
async def env(make_settings):
    settings = make_settings(max_body_bytes=2048)
    async with running_server(settings) as url:
        async with httpx.AsyncClient(base_url=url) as c:
            yield c, settings.database_url


async def test_bad_requests_are_4xx_and_write_nothing(env):
    c, db = env
    post = "/v1/runs"
    json_h = {**A, "content-type": "application/json"}
    cases = [
        (await c.post(post, content=b"{not json", headers=json_h), 400, "invalid_json", None),
        (await c.post(post, content=b"", headers=json_h), 422, "validation_error", None),
        (await c.post(post, json=[1, 2], headers=A), 422, "validation_error", None),
        (await c.post(post, json={"input": {}}, headers=A), 422, "validation_error", "workflow"),
        (await c.post(post, json={"workflow": "nope"}, headers=A), 422, "unknown_workflow", "workflow"),
        (await c.post(post, json={"workflow": "demo", "input": {"steps": "many"}}, headers=A),
         422, "invalid_input", "input.steps"),
        (await c.post(post, json={"workflow": "demo", "input": {"stepz": 1}}, headers=A),
         422, "invalid_input", "input.stepz"),
        (await c.post(post, json={"workflow": "demo", "priority": "high"}, headers=A),
         422, "validation_error", "priority"),
        (await c.post(post, json={"workflow": "demo", "surprise": 1}, headers=A), 422, "validation_error",
         "surprise"),
        (await c.post(post, json={"workflow": "sleep", "input": {"seconds": 1}, "timeout_seconds": -1},
                      headers=A), 422, "validation_error", "timeout_seconds"),
        (await c.post(post, json={"workflow": "echo", "input": {"message": "x" * 5000}}, headers=A),
         413, "payload_too_large", None),
        (await c.post(post, json={"workflow": "agent", "input": {}}, headers=A), 422, "invalid_input", "input.task"),
        (await c.post(post, json={"workflow": "agent", "input": {"task": "t", "tools": ["shell", "rm_rf"]}},
                      headers=A), 422, "invalid_input", "input.tools"),
        (await c.post(post, json={"workflow": "agent", "input": {"task": "t", "files": {"../x": ""}}},
                      headers=A), 422, "invalid_input", "input.files"),
        (await c.post(post, json={"workflow": "agent", "input": {"task": "t", "max_turns": 0}},
                      headers=A), 422, "invalid_input", "input.max_turns"),
        (await c.post(post, json={"workflow": "agent", "input": {"task": "t", "sandbox": {"wall_s": 1e9}}},
                      headers=A), 422, "invalid_input", "input.sandbox.wall_s"),
    ]
    for r, status, code, param in cases:
        assert_error(r, status, code, param)
    assert await count_rows(db) == (0, 0)


async def test_chunked_oversized_body_is_refused(env):
    c, db = env

    async def chunks():
        for _ in range(10):
            yield b" " * 500
        yield json.dumps({"workflow": "echo", "input": {"message": 1}}).encode()

    r = await c.post("/v1/runs", content=chunks(), headers={**A, "content-type": "application/json"})
    assert_error(r, 413, "payload_too_large")
    assert await count_rows(db) == (0, 0)


async def test_unknown_ids_bad_cursors_and_bad_keys(env):
    c, _ = env
    assert_error(await c.get("/v1/runs/run_00000000000000000000000000", headers=A), 404, "run_not_found")
    assert_error(await c.get("/v1/runs/not-an-id", headers=A), 404, "run_not_found")
    assert_error(await c.post("/v1/runs/../../etc/cancel", headers=A), 404, "not_found")
    assert_error(await c.get("/v1/runs/run_00000000000000000000000000/events", headers=A), 404, "run_not_found")
    assert_error(await c.get("/v1/runs", params={"after": "garbage"}, headers=A), 400, "invalid_cursor", "after")
    assert_error(await c.get("/v1/runs", params={"limit": 0}, headers=A), 422, "validation_error", "limit")
    assert_error(await c.get("/v1/runs", params={"status": "sleeping"}, headers=A), 422, "validation_error")
    assert_error(await c.get("/v1/runs"), 401, "missing_api_key")
    assert_error(await c.get("/v1/runs", headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    assert_error(await c.get("/v1/runs", headers={"Authorization": "Basic Zm9vOmJhcg=="}), 401, "missing_api_key")
    assert (await c.get("/v1/runs", headers={"X-API-Key": "sk-test-a"})).status_code == 200
    run = (await c.post("/v1/runs", json={"workflow": "echo", "input": {"message": 1}}, headers=A)).json()
    assert_error(await c.get(f"/v1/runs/{run['id']}/events", headers={**A, "Last-Event-ID": "x"}),
                 422, "validation_error", "last-event-id")
    assert_error(await c.get(f"/v1/runs/{run['id']}/events", params={"starting_after": -1}, headers=A),
                 422, "validation_error", "starting_after")
    assert_error(await c.delete("/v1/runs", headers=A), 405, "method_not_allowed")
    assert_error(await c.post("/v1/runs", json={"workflow": "echo"}, headers={**A, "Idempotency-Key": "k" * 300}),
                 422, "validation_error")

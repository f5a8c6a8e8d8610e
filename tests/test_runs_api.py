"""The runs API end to end over real HTTP, on SQLite and on PostgreSQL + Redis."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from tests.servers import running_server

A = {"Authorization": "Bearer sk-test-a"}
B = {"Authorization": "Bearer sk-test-b"}


async def wait_final(c: httpx.AsyncClient, run_id: str, timeout: float = 20) -> dict[str, Any]:
    r = await c.get(f"/v1/runs/{run_id}", params={"wait": timeout}, headers=A)
    assert r.status_code == 200
    return r.json()


async def sse_events(c: httpx.AsyncClient, run_id: str, headers: dict[str, str] | None = None,
                     params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    out = []
    async with c.stream("GET", f"/v1/runs/{run_id}/events", params=params,
                        headers={**A, "Accept": "text/event-stream", **(headers or {})}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        ev_id = None
        async for line in r.aiter_lines():
            if line.startswith("id: "):
                ev_id = int(line[4:])
            elif line.startswith("data: "):
                ev = json.loads(line[6:])
                assert ev["seq"] == ev_id
                out.append(ev)
    return out


@pytest.fixture
async def client(make_settings):
    async with running_server(make_settings()) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            yield c


async def submit(c: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str] = A) -> dict[str, Any]:
    r = await c.post("/v1/runs", json=body, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


async def test_submit_runs_to_success_with_steps_and_events(client):
    r = await client.post("/v1/runs", json={"workflow": "demo", "input": {"steps": 3, "step_seconds": 0.05},
                                            "metadata": {"team": "x"}, "priority": 5}, headers=A)
    assert r.status_code == 201
    run = r.json()
    assert r.headers["location"] == f"/v1/runs/{run['id']}"
    assert run["status"] == "queued" and run["metadata"] == {"team": "x"} and run["priority"] == 5
    final = await wait_final(client, run["id"])
    assert final["status"] == "succeeded"
    assert final["output"] == {"steps": 3, "total": 0 + 1 + 4}
    assert final["attempt"] == 1 and final["started_at"] >= final["created_at"]
    steps = (await client.get(f"/v1/runs/{run['id']}/steps", headers=A)).json()["data"]
    assert [(s["name"], s["status"]) for s in steps] == [("work-0", "completed"), ("work-1", "completed"),
                                                          ("work-2", "completed")]
    events = (await client.get(f"/v1/runs/{run['id']}/events", headers=A)).json()["data"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    types = [e["type"] for e in events]
    assert types[0] == "run.queued" and types[1] == "run.started" and types[-1] == "run.succeeded"
    assert types.count("step.completed") == 3 and types.count("run.progress") == 3
    assert final["last_event_seq"] == len(events)


async def test_sse_replays_then_tails_and_closes_after_final_event(client):
    run = await submit(client, {"workflow": "demo", "input": {"steps": 4, "step_seconds": 0.2}})
    live = await sse_events(client, run["id"])  # opened while the run is queued/running
    assert [e["seq"] for e in live] == list(range(1, len(live) + 1))
    assert live[-1]["type"] == "run.succeeded"
    # Resume from the middle, both ways: the rest only, no gap, no duplicate.
    by_header = await sse_events(client, run["id"], headers={"Last-Event-ID": "5"})
    by_query = await sse_events(client, run["id"], params={"starting_after": 5})
    assert [e["seq"] for e in by_header] == [e["seq"] for e in by_query] == list(range(6, len(live) + 1))


async def test_sse_sends_keepalive_comments(client):
    run = await submit(client, {"workflow": "sleep", "input": {"seconds": 2.5}})
    comments = 0
    async with client.stream("GET", f"/v1/runs/{run['id']}/events",
                             headers={**A, "Accept": "text/event-stream"}) as r:
        async for line in r.aiter_lines():
            comments += line.startswith(": keep-alive")
    assert comments >= 1  # keep-alive is 1 s in the test settings


async def test_events_json_pages(client):
    run = await submit(client, {"workflow": "demo", "input": {"steps": 3, "step_seconds": 0}})
    await wait_final(client, run["id"])
    page1 = (await client.get(f"/v1/runs/{run['id']}/events", params={"limit": 4}, headers=A)).json()
    assert page1["has_more"] and len(page1["data"]) == 4 and page1["next_cursor"] == "4"
    page2 = (await client.get(f"/v1/runs/{run['id']}/events",
                              params={"limit": 100, "starting_after": page1["next_cursor"]}, headers=A)).json()
    assert not page2["has_more"] and page2["data"][0]["seq"] == 5


async def test_list_paginates_and_filters(client):
    ids = [(await submit(client, {"workflow": "echo", "input": {"message": i}}))["id"] for i in range(5)]
    sleeper = await submit(client, {"workflow": "sleep", "input": {"seconds": 30}})
    for run_id in ids:
        await wait_final(client, run_id)
    seen, after = [], None
    while True:
        params: dict[str, Any] = {"limit": 2, "workflow": "echo"}
        if after:
            params["after"] = after
        page = (await client.get("/v1/runs", params=params, headers=A)).json()
        seen += [r["id"] for r in page["data"]]
        if not page["has_more"]:
            break
        after = page["next_cursor"]
    assert seen == list(reversed(ids))  # newest first, every run once
    succeeded = (await client.get("/v1/runs", params={"status": "succeeded", "limit": 100}, headers=A)).json()
    assert {r["id"] for r in succeeded["data"]} == set(ids)
    active = (await client.get("/v1/runs", params=[("status", "queued"), ("status", "running"),
                                                    ("status", "waiting")], headers=A)).json()
    assert [r["id"] for r in active["data"]] == [sleeper["id"]]
    await client.post(f"/v1/runs/{sleeper['id']}/cancel", headers=A)


async def test_idempotency_key(client):
    body = {"workflow": "echo", "input": {"message": "hi"}}
    h = {**A, "Idempotency-Key": "key-1"}
    r1 = await client.post("/v1/runs", json=body, headers=h)
    r2 = await client.post("/v1/runs", json=body, headers=h)
    assert r1.status_code == r2.status_code == 201
    assert r1.json()["id"] == r2.json()["id"] and r2.headers["idempotent-replayed"] == "true"
    r3 = await client.post("/v1/runs", json={**body, "input": {"message": "other"}}, headers=h)
    assert r3.status_code == 409 and r3.json()["error"]["code"] == "idempotency_key_reused"
    # The same key of another tenant is another key.
    r4 = await client.post("/v1/runs", json=body, headers={**B, "Idempotency-Key": "key-1"})
    assert r4.status_code == 201 and r4.json()["id"] != r1.json()["id"]
    runs = (await client.get("/v1/runs", headers=A)).json()["data"]
    assert len(runs) == 1


async def test_cancel_queued_running_and_idempotent(client, make_settings):
    # Running: the sleep workflow is waiting; cancel stops it at once.
    run = await submit(client, {"workflow": "sleep", "input": {"seconds": 60}})
    for _ in range(100):
        status = (await client.get(f"/v1/runs/{run['id']}", headers=A)).json()["status"]
        if status == "waiting":
            break
        await asyncio.sleep(0.05)
    assert status == "waiting"
    t0 = time.monotonic()
    r = await client.post(f"/v1/runs/{run['id']}/cancel", headers=A)
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")
    final = await wait_final(client, run["id"])
    assert final["status"] == "cancelled" and time.monotonic() - t0 < 5
    again = await client.post(f"/v1/runs/{run['id']}/cancel", headers=A)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    types = [e["type"] for e in (await client.get(f"/v1/runs/{run['id']}/events", headers=A)).json()["data"]]
    assert types[-2:] == ["run.cancelling", "run.cancelled"] and "run.waiting" in types


async def test_cancel_queued_run_never_starts(make_settings):
    async with running_server(make_settings(worker_enabled=False)) as url:
        async with httpx.AsyncClient(base_url=url) as c:
            run = await submit(c, {"workflow": "echo", "input": {"message": 1}})
            r = await c.post(f"/v1/runs/{run['id']}/cancel", headers=A)
            assert r.json()["status"] == "cancelled" and r.json()["error"]["code"] == "cancelled"
            types = [e["type"] for e in (await c.get(f"/v1/runs/{run['id']}/events", headers=A)).json()["data"]]
            assert types == ["run.queued", "run.cancelled"]


async def test_failed_and_timed_out_runs(client):
    bad = await submit(client, {"workflow": "demo", "input": {"steps": 3, "step_seconds": 0, "fail_at_step": 1}})
    final = await wait_final(client, bad["id"])
    assert final["status"] == "failed"
    assert final["error"]["code"] == "step_error" and final["error"]["step"] == "work-1"
    slow = await submit(client, {"workflow": "sleep", "input": {"seconds": 30}, "timeout_seconds": 0.5})
    final = await wait_final(client, slow["id"])
    assert final["status"] == "timed_out" and final["error"]["code"] == "timeout"


async def test_long_poll_returns_early_when_run_finishes(client):
    run = await submit(client, {"workflow": "sleep", "input": {"seconds": 0.5}})
    t0 = time.monotonic()
    final = (await client.get(f"/v1/runs/{run['id']}", params={"wait": 20}, headers=A)).json()
    assert final["status"] == "succeeded" and time.monotonic() - t0 < 10
    pending = await submit(client, {"workflow": "sleep", "input": {"seconds": 30}})
    t0 = time.monotonic()
    r = (await client.get(f"/v1/runs/{pending['id']}", params={"wait": 0.5}, headers=A)).json()
    assert r["status"] in ("queued", "running", "waiting") and 0.4 < time.monotonic() - t0 < 5
    await client.post(f"/v1/runs/{pending['id']}/cancel", headers=A)


async def test_tenants_never_see_each_other(client):
    run = await submit(client, {"workflow": "echo", "input": {"message": "secret"}})
    for method, path in [("GET", ""), ("GET", "/steps"), ("GET", "/events"), ("POST", "/cancel")]:
        r = await client.request(method, f"/v1/runs/{run['id']}{path}", headers=B)
        assert r.status_code == 404 and r.json()["error"]["code"] == "run_not_found"
    assert (await client.get("/v1/runs", headers=B)).json()["data"] == []


async def test_openapi_documents_runs_api(client):
    spec = (await client.get("/openapi.json")).json()
    for path in ["/v1/runs", "/v1/runs/{run_id}", "/v1/runs/{run_id}/cancel", "/v1/runs/{run_id}/steps",
                 "/v1/runs/{run_id}/events", "/v1/workflows"]:
        assert path in spec["paths"]
    assert "RunCreate" in spec["components"]["schemas"]
    wf = (await client.get("/v1/workflows", headers=A)).json()["data"]
    assert {"echo", "demo", "sleep"} <= {w["name"] for w in wf}

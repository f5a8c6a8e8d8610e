"""Managing runs after the fact: resume a stopped run from its checkpoints, fork a new run from
another's. Over real HTTP, on SQLite and on PostgreSQL + Redis."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.servers import running_server
from tests.test_runs_api import A, B, submit, wait_final


@pytest.fixture
async def client(make_settings):
    async with running_server(make_settings()) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            yield c


async def steps_of(c: httpx.AsyncClient, run_id: str) -> list[dict]:
    return (await c.get(f"/v1/runs/{run_id}/steps", headers=A)).json()["data"]


async def events_of(c: httpx.AsyncClient, run_id: str) -> list[dict]:
    return (await c.get(f"/v1/runs/{run_id}/events", params={"limit": 1000}, headers=A)).json()["data"]


async def test_resume_a_cancelled_run_replays_its_completed_steps(client):
    run = await submit(client, {"workflow": "demo", "input": {"steps": 5, "step_seconds": 0.3}})
    for _ in range(200):  # until two steps are checkpointed
        if len([s for s in await steps_of(client, run["id"]) if s["status"] == "completed"]) >= 2:
            break
        await asyncio.sleep(0.05)
    assert (await client.post(f"/v1/runs/{run['id']}/cancel", headers=A)).status_code == 200
    cancelled = await wait_final(client, run["id"])
    assert cancelled["status"] == "cancelled"
    before = {s["step_id"]: s for s in await steps_of(client, run["id"]) if s["status"] == "completed"}
    assert len(before) >= 2

    r = await client.post(f"/v1/runs/{run['id']}/resume", headers=A)
    assert r.status_code == 200, r.text
    assert r.json()["status"] in ("queued", "running") and r.json()["error"] is None
    final = await wait_final(client, run["id"])
    assert final["status"] == "succeeded" and final["output"] == {"steps": 5, "total": 0 + 1 + 4 + 9 + 16}
    assert final["attempt"] == 2
    after = {s["step_id"]: s for s in await steps_of(client, run["id"])}
    for step_id, step in before.items():  # checkpointed before the cancel: not run again
        assert after[step_id]["attempt"] == 1 and after[step_id]["finished_at"] == step["finished_at"]
    assert all(s["status"] == "completed" for s in after.values()) and len(after) == 5
    events = await events_of(client, run["id"])
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    types = [e["type"] for e in events]
    assert types.count("run.resumed") == 1 and types[-1] == "run.succeeded"
    assert types.index("run.cancelled") < types.index("run.resumed")
    # progress events of the replayed steps are not written twice
    assert [e["data"]["done"] for e in events if e["type"] == "run.progress"] == [1, 2, 3, 4, 5]


async def test_resume_refuses_runs_that_succeeded_and_other_tenants_runs(client):
    run = await submit(client, {"workflow": "echo", "input": {"message": 1}})
    assert (await wait_final(client, run["id"]))["status"] == "succeeded"
    r = await client.post(f"/v1/runs/{run['id']}/resume", headers=A)
    assert r.status_code == 409 and r.json()["error"]["code"] == "run_not_resumable"
    r = await client.post(f"/v1/runs/{run['id']}/resume", headers=B)
    assert r.status_code == 404 and r.json()["error"]["code"] == "run_not_found"
    assert (await client.get(f"/v1/runs/{run['id']}", headers=A)).json()["status"] == "succeeded"


async def test_fork_runs_from_a_step_with_the_earlier_checkpoints(client):
    original = await submit(client, {"workflow": "demo", "input": {"steps": 4, "step_seconds": 0.01},
                                     "metadata": {"k": "v"}, "priority": 3})
    assert (await wait_final(client, original["id"]))["status"] == "succeeded"
    r = await client.post(f"/v1/runs/{original['id']}/fork", json={"from_step": 2},
                          headers={**A, "Idempotency-Key": "fork-1"})
    assert r.status_code == 201, r.text
    fork = r.json()
    assert fork["id"] != original["id"] and r.headers["location"] == f"/v1/runs/{fork['id']}"
    assert fork["forked_from"] == original["id"] and fork["forked_from_step"] == 2
    assert fork["input"] == original["input"] and fork["metadata"] == {"k": "v"} and fork["priority"] == 3
    again = await client.post(f"/v1/runs/{original['id']}/fork", json={"from_step": 2},
                              headers={**A, "Idempotency-Key": "fork-1"})
    assert again.status_code == 201 and again.json()["id"] == fork["id"]
    assert again.headers["idempotent-replayed"] == "true"

    final = await wait_final(client, fork["id"])
    assert final["status"] == "succeeded" and final["output"] == {"steps": 4, "total": 0 + 1 + 4 + 9}
    mine = await steps_of(client, fork["id"])
    theirs = await steps_of(client, original["id"])
    assert [s["step_id"] for s in mine] == [0, 1, 2, 3]
    assert [s["finished_at"] for s in mine[:2]] == [s["finished_at"] for s in theirs[:2]]  # copied
    assert all(m["finished_at"] > t["finished_at"] for m, t in zip(mine[2:], theirs[2:], strict=True))  # executed
    events = await events_of(client, fork["id"])
    assert events[0]["type"] == "run.queued" and events[0]["data"]["forked_from"] == original["id"]
    started = [e["data"]["step_id"] for e in events if e["type"] == "step.started"]
    assert started == [2, 3]
    assert (await client.get(f"/v1/runs/{original['id']}", headers=A)).json()["last_event_seq"] == \
        len(await events_of(client, original["id"]))  # the original is untouched


async def test_fork_refuses_a_step_without_checkpoints_and_other_tenants(client):
    original = await submit(client, {"workflow": "demo", "input": {"steps": 2, "step_seconds": 0.01}})
    assert (await wait_final(client, original["id"]))["status"] == "succeeded"
    r = await client.post(f"/v1/runs/{original['id']}/fork", json={"from_step": 3}, headers=A)
    assert r.status_code == 409 and r.json()["error"]["code"] == "step_not_completed"
    assert r.json()["error"]["param"] == "from_step"
    r = await client.post(f"/v1/runs/{original['id']}/fork", json={"from_step": 1}, headers=B)
    assert r.status_code == 404
    for bad in ({"from_step": -1}, {"from_step": "1"}, {}, {"from_step": 1, "x": 1}):
        r = await client.post(f"/v1/runs/{original['id']}/fork", json=bad, headers=A)
        assert r.status_code == 422, (bad, r.text)
    runs = (await client.get("/v1/runs", headers=A)).json()["data"]
    assert [run["id"] for run in runs] == [original["id"]]  # nothing half-made

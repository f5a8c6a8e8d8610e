"""Named queues (``ORCH_QUEUES``): how many runs of a queue, and of one tenant in it, execute at
once, over real HTTP on SQLite and on PostgreSQL + Redis; and the claim's pick on its own."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from orchestrator.runs.store import pick_fair
from orchestrator.settings import QueueLimits, Settings
from tests.servers import running_server
from tests.test_runs_api import A, B, submit, wait_final

QUEUES = {"narrow": QueueLimits(concurrency=2), "fair": QueueLimits(tenant_concurrency=1)}


@pytest.fixture
async def client(make_settings):
    async with running_server(make_settings(queues=QUEUES)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            yield c


async def statuses(c: httpx.AsyncClient, ids: list[str], headers: dict[str, str] = A) -> list[str]:
    return [(await c.get(f"/v1/runs/{i}", headers=headers)).json()["status"] for i in ids]


async def test_a_queue_runs_no_more_than_its_concurrency(client):
    runs = [await submit(client, {"workflow": "sleep", "input": {"seconds": 0.6}, "queue": "narrow"})
            for _ in range(5)]
    ids = [r["id"] for r in runs]
    assert all(r["queue"] == "narrow" for r in runs)
    most = 0
    for _ in range(400):
        # one query, one snapshot: run by run, a run read running may finish before the next is read
        listed = (await client.get("/v1/runs", params={"status": ["running", "waiting"], "limit": 100},
                                   headers=A)).json()["data"]
        executing = [r["id"] for r in listed if r["id"] in ids]
        most = max(most, len(executing))
        assert most <= 2, executing
        now = await statuses(client, ids)
        if all(s == "succeeded" for s in now):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"runs did not finish: {now}")
    assert most == 2  # it did run two at once


async def test_tenants_take_turns_in_a_queue_with_a_tenant_limit(client):
    a = [await submit(client, {"workflow": "sleep", "input": {"seconds": 2}, "queue": "fair"})
         for _ in range(3)]
    b = await submit(client, {"workflow": "sleep", "input": {"seconds": 0.1}, "queue": "fair"}, headers=B)
    b_done = (await client.get(f"/v1/runs/{b['id']}", params={"wait": 20}, headers=B)).json()
    assert b_done["status"] == "succeeded"
    a_now = await statuses(client, [r["id"] for r in a])
    # tenant b's run went before tenant a's second and third: a has one at a time
    assert a_now.count("queued") >= 1, a_now
    assert sum(s in ("running", "waiting") for s in a_now) <= 1, a_now
    for r in a:
        assert (await wait_final(client, r["id"], timeout=30))["status"] == "succeeded"


async def test_unknown_queue_is_refused_and_default_still_runs(client):
    r = await client.post("/v1/runs", json={"workflow": "echo", "input": {"message": 1}, "queue": "nope"}, headers=A)
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_queue"
    assert r.json()["error"]["param"] == "queue"
    r = await client.post("/v1/runs", json={"workflow": "echo", "input": {"message": 1}, "queue": "Bad Name"},
                          headers=A)
    assert r.status_code == 422 and r.json()["error"]["param"] == "queue"
    run = await submit(client, {"workflow": "echo", "input": {"message": 1}})
    assert run["queue"] == "default"
    assert (await wait_final(client, run["id"]))["status"] == "succeeded"
    assert [x["id"] for x in (await client.get("/v1/runs", headers=A)).json()["data"]] == [run["id"]]


def test_queue_names_are_checked_in_settings():
    with pytest.raises(ValueError):
        Settings(queues={"Not OK": {}})
    assert Settings(queues='{"rollouts": {"concurrency": 4}}').queues["rollouts"].concurrency == 4


def test_pick_takes_turns_over_tenants_within_limits():
    rows: list[Any] = [(f"a{i}", 0, "q", "a", 0) for i in range(4)] + [("b0", 0, "q", "b", 0), ("c0", 0, "q", "c", 0)]
    limits = {"q": QueueLimits(concurrency=4, tenant_concurrency=2)}
    picked = [run_id for run_id, _ in pick_fair(rows, {("q", "a"): 1}, limits, 10)]
    # a holds one slot already, so one more of a's; b and c come before a's second turn
    assert picked == ["a0", "b0", "c0"]
    assert [r for r, _ in pick_fair(rows, {}, {"q": QueueLimits(concurrency=3)}, 10)] == ["a0", "b0", "c0"]
    assert [r for r, _ in pick_fair(rows, {}, {"q": QueueLimits(concurrency=3)}, 2)] == ["a0", "b0"]
    urgent = [*rows, ("a9", 0, "q", "a", 5)]
    assert pick_fair(urgent, {}, {"q": QueueLimits(concurrency=1)}, 10) == [("a9", 0)]  # priority first

"""Two service processes sharing PostgreSQL and Redis."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import ServiceProcess

pytestmark = pytest.mark.slow
A = {"Authorization": "Bearer sk-test-a"}


@pytest.fixture
def shared_env(pg_database: str, redis_url: str) -> dict[str, str]:
    return {"ORCH_DATABASE_URL": pg_database, "ORCH_REDIS_URL": redis_url,
            "ORCH_API_KEYS": "sk-test-a=tenant-a", "ORCH_LEASE_SECONDS": "2", "ORCH_HEARTBEAT_SECONDS": "0.4",
            "ORCH_WORKER_POLL_SECONDS": "0.2"}


def test_either_replica_executes_runs(shared_env: dict[str, str], tmp_path: Path) -> None:
    env = {**shared_env, "ORCH_WORKER_CONCURRENCY": "2"}
    a = ServiceProcess(env, tmp_path / "a.log").start()
    b = ServiceProcess(env, tmp_path / "b.log").start()
    try:
        ids = [httpx.post(f"{(a, b)[i % 2].url}/v1/runs", headers=A,
                          json={"workflow": "demo", "input": {"steps": 2, "step_seconds": 0.3}}).json()["id"]
               for i in range(8)]
        workers = set()
        for run_id in ids:
            run = httpx.get(f"{b.url}/v1/runs/{run_id}", params={"wait": 30}, headers=A, timeout=40).json()
            assert run["status"] == "succeeded"
            started = httpx.get(f"{a.url}/v1/runs/{run_id}/events", headers=A).json()["data"][1]
            assert started["type"] == "run.started"
            workers.add(started["data"]["worker"])
        assert len(workers) == 2  # 8 runs, 2 slots each: both replicas had to work
    finally:
        a.stop()
        b.stop()


def test_sse_reader_on_one_replica_sees_run_on_other_live(shared_env: dict[str, str], tmp_path: Path) -> None:
    # B executes nothing and polls its database only every 30 s: what it streams comes through Redis.
    a = ServiceProcess(shared_env, tmp_path / "a.log").start()
    b = ServiceProcess({**shared_env, "ORCH_WORKER_ENABLED": "false", "ORCH_SSE_KEEPALIVE_SECONDS": "30"},
                       tmp_path / "b.log").start()
    try:
        received: list[tuple[float, dict[str, Any]]] = []
        opened = threading.Event()

        def reader(run_id: str) -> None:
            with httpx.stream("GET", f"{b.url}/v1/runs/{run_id}/events", timeout=60,
                              headers={**A, "Accept": "text/event-stream"}) as r:
                opened.set()
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        received.append((time.time(), json.loads(line[6:])))

        run_id = httpx.post(f"{a.url}/v1/runs", headers=A,
                            json={"workflow": "demo", "input": {"steps": 4, "step_seconds": 0.5}}).json()["id"]
        t = threading.Thread(target=reader, args=(run_id,))
        t.start()
        opened.wait(10)
        t.join(60)
        events = [e for _, e in received]
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert events[-1]["type"] == "run.succeeded"
        live = [(at - e["created_at"]) for at, e in received if e["type"] in ("step.completed", "run.succeeded")]
        assert len(live) == 5 and max(live) < 1.0, live  # each arrived within a second of being written
        workers = {e["data"].get("worker") for e in events if e["type"] == "run.started"}
        assert len(workers) == 1
    finally:
        a.stop()
        b.stop()


def test_cancel_on_one_replica_stops_run_on_the_other(shared_env: dict[str, str], tmp_path: Path) -> None:
    a = ServiceProcess(shared_env, tmp_path / "a.log").start()
    b = ServiceProcess({**shared_env, "ORCH_WORKER_ENABLED": "false"}, tmp_path / "b.log").start()
    try:
        run_id = httpx.post(f"{a.url}/v1/runs", headers=A,
                            json={"workflow": "sleep", "input": {"seconds": 60}}).json()["id"]
        deadline = time.monotonic() + 10
        while httpx.get(f"{b.url}/v1/runs/{run_id}", headers=A).json()["status"] != "waiting":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        t0 = time.monotonic()
        httpx.post(f"{b.url}/v1/runs/{run_id}/cancel", headers=A)
        run = httpx.get(f"{b.url}/v1/runs/{run_id}", params={"wait": 10}, headers=A, timeout=20).json()
        assert run["status"] == "cancelled" and time.monotonic() - t0 < 2
    finally:
        a.stop()
        b.stop()

"""Crash: SIGKILL the service mid-run; a new process finishes the run exactly once.

The run's steps append to a journal file, so the test sees every execution of
every step across both processes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import ServiceProcess

pytestmark = pytest.mark.slow
A = {"Authorization": "Bearer sk-test-a"}
ENV = {"ORCH_API_KEYS": "sk-test-a=tenant-a", "ORCH_WORKFLOW_MODULES": "tests.journal_workflow",
       "ORCH_LEASE_SECONDS": "2", "ORCH_HEARTBEAT_SECONDS": "0.4", "ORCH_WORKER_POLL_SECONDS": "0.2",
       "ORCH_SSE_KEEPALIVE_SECONDS": "1"}


def read_sse(url: str, run_id: str, *, last_event_id: int | None, stop_after: int | None) -> list[dict[str, Any]]:
    headers = {**A, "Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    events: list[dict[str, Any]] = []
    with httpx.stream("GET", f"{url}/v1/runs/{run_id}/events", headers=headers, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if stop_after is not None and len(events) >= stop_after:
                    break  # the client drops its connection here
    return events


def journal_lines(path: Path) -> list[str]:
    return [line.split(" pid=")[0] for line in path.read_text().splitlines()]


# A lease too long to wait for: a run taken over sooner was taken over because its worker was gone.
LONG_LEASE = {"ORCH_LEASE_SECONDS": "120", "ORCH_HEARTBEAT_SECONDS": "5", "ORCH_WORKER_POLL_SECONDS": "0.5"}


def wait_for_line(journal: Path, line: str, timeout: float) -> None:
    """Until a step has written ``line`` (``"end 0"``) to the journal; fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not journal.exists() or line not in journal_lines(journal):
        assert time.monotonic() < deadline, f"no {line!r} in the journal after {timeout} s"
        time.sleep(0.02)


def db_env(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    if backend == "postgres":
        return {"ORCH_DATABASE_URL": request.getfixturevalue("pg_database"),
                "ORCH_REDIS_URL": request.getfixturevalue("redis_url")}
    return {"ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/orch.db"}


def test_sigkill_mid_run_recovers_without_repeating_steps(backend, request, tmp_path):
    env = {**ENV, **db_env(backend, request, tmp_path)}
    journal = tmp_path / "journal.txt"
    first = ServiceProcess(env, tmp_path / "first.log").start()
    second = None
    try:
        r = httpx.post(f"{first.url}/v1/runs", headers=A, json={
            "workflow": "journal", "input": {"journal": str(journal), "steps": 6, "step_seconds": 0.4}})
        assert r.status_code == 201
        run_id = r.json()["id"]
        # A client reads the stream up to the end of step 2, then its connection drops.
        seen = []
        with httpx.stream("GET", f"{first.url}/v1/runs/{run_id}/events",
                          headers={**A, "Accept": "text/event-stream"}, timeout=60) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if seen[-1]["type"] == "step.completed" and seen[-1]["data"]["step_id"] == 2:
                        break
        # Kill the service in the middle of step 3.
        deadline = time.monotonic() + 10
        while "start 3" not in journal_lines(journal) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "start 3" in journal_lines(journal) and "end 3" not in journal_lines(journal)
        first.kill()

        second = ServiceProcess(env, tmp_path / "second.log").start()
        rest = read_sse(second.url, run_id, last_event_id=seen[-1]["seq"], stop_after=None)
        events = seen + rest
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(1, len(events) + 1)), "gap or duplicate in the resumed stream"
        assert events[-1]["type"] == "run.succeeded"
        assert [e["type"] for e in events].count("run.recovered") == 1

        run = httpx.get(f"{second.url}/v1/runs/{run_id}", headers=A).json()
        assert run["status"] == "succeeded" and run["output"] == {"total": sum(i * 10 for i in range(6))}
        assert run["attempt"] == 2
        lines = journal_lines(journal)
        for i in range(6):
            assert lines.count(f"end {i}") == 1, lines  # every step finished exactly once
        for i in range(3):
            assert lines.count(f"start {i}") == 1, lines  # finished steps never ran again
        assert lines.count("start 3") == 2  # the step that was in flight ran again
        progress = [e["data"]["done"] for e in events if e["type"] == "run.progress"]
        assert progress == [1, 2, 3, 4, 5, 6]  # workflow events are not re-emitted on replay
        steps = httpx.get(f"{second.url}/v1/runs/{run_id}/steps", headers=A).json()["data"]
        assert [s["status"] for s in steps] == ["completed"] * 6
        assert [s["attempt"] for s in steps] == [1, 1, 1, 2, 2, 2]
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_run_fails_with_worker_lost_after_max_attempts(tmp_path):
    env = {**ENV, "ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/orch.db", "ORCH_MAX_ATTEMPTS": "2"}
    journal = tmp_path / "journal.txt"
    run_id = None
    procs = []
    try:
        for attempt in (1, 2):
            proc = ServiceProcess(env, tmp_path / f"p{attempt}.log").start()
            procs.append(proc)
            if run_id is None:
                run_id = httpx.post(f"{proc.url}/v1/runs", headers=A, json={
                    "workflow": "journal", "input": {"journal": str(journal), "steps": 3, "step_seconds": 30}
                }).json()["id"]
            deadline = time.monotonic() + 15
            while (journal_lines(journal).count("start 0") if journal.exists() else 0) < attempt:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            proc.kill()
        last = ServiceProcess(env, tmp_path / "p3.log").start()
        procs.append(last)
        run = httpx.get(f"{last.url}/v1/runs/{run_id}", params={"wait": 20}, headers=A).json()
        assert run["status"] == "failed" and run["error"]["code"] == "worker_lost"
        assert journal_lines(journal).count("start 0") == 2  # not started a third time
    finally:
        for p in procs:
            p.stop()


def test_clean_shutdown_hands_runs_over_at_once(tmp_path):
    # A 60 s lease: only an explicit hand-over lets the next process continue quickly.
    env = {**ENV, "ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/orch.db", "ORCH_LEASE_SECONDS": "60",
           "ORCH_HEARTBEAT_SECONDS": "5"}
    journal = tmp_path / "journal.txt"
    first = ServiceProcess(env, tmp_path / "first.log").start()
    second = None
    try:
        run_id = httpx.post(f"{first.url}/v1/runs", headers=A, json={
            "workflow": "journal", "input": {"journal": str(journal), "steps": 4, "step_seconds": 0.3}}).json()["id"]
        wait_for_line(journal, "end 0", 10)
        first.stop()  # SIGTERM
        t0 = time.monotonic()
        second = ServiceProcess(env, tmp_path / "second.log").start()
        run = httpx.get(f"{second.url}/v1/runs/{run_id}", params={"wait": 30}, headers=A, timeout=40).json()
        assert run["status"] == "succeeded" and time.monotonic() - t0 < 20
        events = httpx.get(f"{second.url}/v1/runs/{run_id}/events", headers=A).json()["data"]
        recovered = [e for e in events if e["type"] == "run.recovered"]
        assert len(recovered) == 1 and recovered[0]["data"]["reason"] == "released"
        assert journal_lines(journal).count("end 0") == 1
    finally:
        first.stop()
        if second is not None:
            second.stop()



@pytest.mark.postgres
def test_sigkill_runs_move_to_a_live_worker_before_the_lease_expires(request, tmp_path):
    # A 120 s lease: the run is taken over long before it could expire, because the live worker
    # sees that the dead one's PostgreSQL session (and with it its liveness lock) is gone.
    env = {**ENV, **db_env("postgres", request, tmp_path), **LONG_LEASE}
    journal = tmp_path / "journal.txt"
    procs = [ServiceProcess(env, tmp_path / f"p{i}.log").start() for i in range(2)]
    try:
        run_id = httpx.post(f"{procs[0].url}/v1/runs", headers=A, json={
            "workflow": "journal", "input": {"journal": str(journal), "steps": 4, "step_seconds": 1.0}}).json()["id"]
        wait_for_line(journal, "start 1", 15)  # step 0 is checkpointed
        pid = int(journal.read_text().split("pid=")[1].split()[0])
        [owner] = [p for p in procs if p.proc is not None and p.proc.pid == pid]
        [live] = [p for p in procs if p is not owner]
        owner.kill()
        t0 = time.monotonic()
        run = httpx.get(f"{live.url}/v1/runs/{run_id}", params={"wait": 60}, headers=A, timeout=70).json()
        took = time.monotonic() - t0
        assert run["status"] == "succeeded" and run["attempt"] == 2, run
        assert took < 60, f"taken over after {took:.1f} s: waited for the 120 s lease?"
        events = httpx.get(f"{live.url}/v1/runs/{run_id}/events", headers=A).json()["data"]
        recovered = [e for e in events if e["type"] == "run.recovered"]
        assert len(recovered) == 1 and recovered[0]["data"]["reason"] == "worker_gone", recovered
        lines = journal_lines(journal)
        assert lines.count("start 0") == 1 and all(lines.count(f"end {i}") == 1 for i in range(4)), lines
    finally:
        for p in procs:
            p.stop()


@pytest.mark.postgres
def test_worker_whose_session_is_terminated_stops_its_runs_and_comes_back(request, tmp_path):
    """pg_terminate_backend on a live worker's liveness session: it must stop executing at once
    (another worker may take the run over now), and it rejoins under a new id."""
    import asyncio

    import asyncpg

    env = {**ENV, **db_env("postgres", request, tmp_path), **LONG_LEASE}
    dsn = env["ORCH_DATABASE_URL"].replace("postgresql+asyncpg://", "postgresql://")
    journal = tmp_path / "journal.txt"
    first = ServiceProcess(env, tmp_path / "first.log").start()
    try:
        run_id = httpx.post(f"{first.url}/v1/runs", headers=A, json={
            "workflow": "journal", "input": {"journal": str(journal), "steps": 4, "step_seconds": 0.5}}).json()["id"]
        wait_for_line(journal, "end 0", 15)

        async def terminate() -> int:
            conn = await asyncpg.connect(dsn)
            try:
                return await conn.fetchval(
                    "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l WHERE l.locktype = 'advisory'"
                    " AND l.classid = $1 AND l.objsubid = 2 AND l.granted"
                    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                    0x6F726368)
            finally:
                await conn.close()

        assert asyncio.run(terminate()) == 1
        # the same process finishes the run: it stopped it, rejoined, and recovered it
        run = httpx.get(f"{first.url}/v1/runs/{run_id}", params={"wait": 60}, headers=A, timeout=70).json()
        assert run["status"] == "succeeded" and run["attempt"] == 2, run
        lines = [line.split()[0:2] for line in journal.read_text().splitlines()]
        workers = {line.split("worker=")[1].split()[0] for line in journal.read_text().splitlines()}
        assert len(workers) == 2, workers  # a new worker id after the session was lost
        # no step of the first execution ran on after the second began: it was stopped first
        text = journal.read_text().splitlines()
        first_id = text[0].split("worker=")[1].split()[0]
        second_start = min(float(t.split("mono=")[1].split()[0]) for t in text if first_id not in t)
        assert all(float(t.split("mono=")[1].split()[0]) <= second_start for t in text if first_id in t), text
        assert lines.count(["end", "3"]) == 1
    finally:
        first.stop()

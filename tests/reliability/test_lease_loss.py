"""Lease loss: a worker that cannot renew its lease stops its runs before another may take them.

``test_paused_replica_*``: two real service processes, A and B, share PostgreSQL and Redis. A is
SIGSTOPped while it executes runs of the ``journal`` workflow (each step appends its start, and
its end or cancel, to the run's journal file) for longer than its lease; B takes the runs over;
A is resumed (SIGCONT) once B has finished them, or while B is still taking them over. The
journals and the event logs then say where and when every step function ran.

The other tests drive one worker in this process, whose heartbeat never answers (a database
that stopped answering) while its other queries work.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import httpx
import pytest

from orchestrator import RunContext, Settings
from orchestrator.db import create_engine, migrate
from orchestrator.events.bus import InProcessBus
from orchestrator.metrics import Metrics
from orchestrator.runs.records import RunRecord
from orchestrator.runs.store import Lease, NewRun, RunStore
from orchestrator.runs.worker import Worker
from orchestrator.workflows.registry import WorkflowRegistry
from tests import journal_workflow
from tests.servers import ServiceProcess

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

KEY = {"Authorization": "Bearer sk-test-a"}
RUNS = 12
STEPS = 3
# Longer than A's pause, so that some of A's steps are still in flight when it resumes.
STEP_SECONDS = 3.0
TERMINAL = {"succeeded", "failed", "cancelled", "timed_out"}
# Generous: the machine may be shared and loaded; every wait polls and returns as soon as it can.
PATIENCE = 180.0
LINE = re.compile(r"^(start|end|cancel) (\d+) pid=(\d+) worker=(\S+) mono=([\d.]+) wall=([\d.]+)$")


# ---- what the journals and the logs say ----------------------------------------------------

@dataclass
class StepRun:
    """One execution of one step function, from its journal lines (``mono`` clock)."""

    step: int
    pid: int
    worker: str
    start: float
    start_wall: float
    finish: float | None = None  # its end or cancel line; None: neither was written
    finish_wall: float | None = None
    cancelled: bool = False


def step_runs(path: Path) -> list[StepRun]:
    """Pair each start with the next end or cancel of the same step in the same process."""
    runs: list[StepRun] = []
    for line in path.read_text().splitlines() if path.exists() else []:
        what, step, pid, worker, mono, wall = LINE.match(line).groups()  # type: ignore[union-attr]
        if what == "start":
            runs.append(StepRun(int(step), int(pid), worker, float(mono), float(wall)))
            continue
        open_ = [r for r in runs if r.step == int(step) and r.pid == int(pid) and r.finish is None]
        assert open_, f"{what} without a start in {path}: {line}"
        open_[0].finish, open_[0].finish_wall, open_[0].cancelled = float(mono), float(wall), what == "cancel"
    return runs


@dataclass(frozen=True)
class Pause:
    """When a process was stopped, and when it ran again (its first journal line after SIGCONT)."""

    pid: int
    stopped: float
    woke: float


def concurrent(runs: Sequence[StepRun], pause: Pause | None = None) -> list[tuple[StepRun, StepRun]]:
    """Pairs ``(a, b)`` of executions of one step where ``b`` started while ``a`` was running.

    A stopped process runs nothing: a step it had in flight was not running while another
    worker took the run over (as for a crashed worker, that step is at-least-once). Once the
    process runs again, the rest of that step counts as running.
    """
    def running(r: StepRun, t: float) -> bool:
        if not r.start <= t < (float("inf") if r.finish is None else r.finish):
            return False
        return pause is None or r.pid != pause.pid or not pause.stopped <= t < pause.woke

    return [(a, b) for a in runs for b in runs if a is not b and a.step == b.step and running(a, b.start)]


def claims(events: Sequence[dict[str, Any]]) -> list[tuple[str, float]]:
    """``(worker, wall time)`` of every claim of a run (first claim and recoveries)."""
    return [(e["data"]["worker"], e["created_at"]) for e in events if e["type"] in ("run.started", "run.recovered")]


def assert_log_is_clean(run: dict[str, Any], events: list[dict[str, Any]]) -> None:
    """Finished once, every step completed exactly once, gap-free sequence numbers."""
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), events
    finals = [e for e in events if e["type"] in {f"run.{s}" for s in TERMINAL}]
    assert len(finals) == 1 and finals[0] == events[-1], events
    assert run["status"] == "succeeded", run
    assert run["output"] == {"total": sum(i * 10 for i in range(STEPS))}
    completed = sorted(e["data"]["step_id"] for e in events if e["type"] == "step.completed")
    assert completed == list(range(STEPS)), events
    assert [e["data"]["done"] for e in events if e["type"] == "run.progress"] == list(range(1, STEPS + 1))


# ---- two replicas --------------------------------------------------------------------------

def wait_until(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + PATIENCE
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def executing(proc: ServiceProcess) -> float:
    """The process's ``orchestrator_runs_executing`` gauge."""
    text = httpx.get(f"{proc.url}/metrics", timeout=30).text
    return float(re.search(r"^orchestrator_runs_executing (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


def finished(proc: ServiceProcess, run_ids: Sequence[str]) -> bool:
    return all(httpx.get(f"{proc.url}/v1/runs/{rid}", headers=KEY, timeout=30).json()["status"] in TERMINAL
               for rid in run_ids)


@pytest.fixture
def replica_env(pg_database: str, redis_url: str) -> dict[str, str]:
    return {"ORCH_DATABASE_URL": pg_database, "ORCH_REDIS_URL": redis_url, "ORCH_API_KEYS": "sk-test-a=tenant-a",
            "ORCH_WORKFLOW_MODULES": "tests.journal_workflow", "ORCH_LEASE_SECONDS": "2",
            "ORCH_HEARTBEAT_SECONDS": "0.3", "ORCH_WORKER_POLL_SECONDS": "0.2", "ORCH_MAX_ATTEMPTS": "10"}


@pytest.mark.redis
@pytest.mark.parametrize("resume, b_slots", [("after_takeover", 16), ("during_takeover", 2)])
def test_paused_replica_starts_no_step_of_runs_it_lost(resume: str, b_slots: int, replica_env: dict[str, str],
                                                        tmp_path: Path) -> None:
    # "during_takeover": B has two slots, so when A resumes some of its expired runs are
    # still unclaimed, and A could take them back while it still executes them.
    a = ServiceProcess({**replica_env, "ORCH_WORKER_CONCURRENCY": "16"}, tmp_path / "a.log").start()
    b = ServiceProcess({**replica_env, "ORCH_WORKER_CONCURRENCY": str(b_slots)}, tmp_path / "b.log").start()
    assert a.proc is not None and b.proc is not None
    a_pid, b_pid = a.proc.pid, b.proc.pid
    journals: dict[str, Path] = {}
    try:
        for i in range(RUNS):
            path = tmp_path / f"journal-{i}.txt"
            r = httpx.post(f"{a.url}/v1/runs", headers=KEY, timeout=30, json={"workflow": "journal", "input": {
                "journal": str(path), "steps": STEPS, "step_seconds": STEP_SECONDS}})
            assert r.status_code == 201, r.text
            journals[r.json()["id"]] = path
        wait_until("every run has started a step", lambda: all(p.exists() for p in journals.values()))
        a.proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()  # read after: whatever A wrote, it wrote before this
        on_a = [rid for rid, p in journals.items() if any(r.pid == a_pid for r in step_runs(p))]
        assert on_a, "A executed none of the runs"
        if resume == "during_takeover":
            wait_until("B took over one of A's runs", lambda: any(
                r.pid == b_pid for rid in on_a for r in step_runs(journals[rid])))
        else:
            wait_until("B finished A's runs", lambda: finished(b, on_a))
        resumed = time.monotonic()  # read before: whatever A writes next, it writes after this
        a.proc.send_signal(signal.SIGCONT)

        wait_until("every run finished", lambda: finished(b, list(journals)))
        wait_until("A executes nothing", lambda: executing(a) == 0)

        ran = {rid: step_runs(path) for rid, path in journals.items()}
        a_lines = [t for rs in ran.values() for r in rs if r.pid == a_pid for t in (r.start, r.finish) if t]
        pause = Pause(a_pid, stopped, woke=min((t for t in a_lines if t >= resumed), default=resumed))
        failures = []
        for rid in journals:
            run = httpx.get(f"{b.url}/v1/runs/{rid}", headers=KEY, timeout=30).json()
            events = httpx.get(f"{b.url}/v1/runs/{rid}/events", headers=KEY, params={"limit": 1000},
                               timeout=30).json()["data"]
            assert_log_is_clean(run, events)
            a_worker = {r.worker for r in ran[rid] if r.pid == a_pid}
            taken = [at for worker, at in claims(events) if worker not in a_worker]
            late = [r.step for r in ran[rid] if r.pid == a_pid and taken and r.start_wall >= min(taken)]
            if late:
                failures.append(f"{rid}: A started steps {late} after another worker had claimed the run")
            twice = concurrent(ran[rid], pause)
            if twice:
                failures.append(f"{rid}: steps ran concurrently: {twice}")
        assert not failures, "\n".join(failures)
    finally:
        a.proc.send_signal(signal.SIGCONT)
        a.stop()
        b.stop()


# ---- one worker whose heartbeat hangs -------------------------------------------------------

class HangingHeartbeatStore(RunStore):
    """A store whose heartbeat never answers once ``hang`` is set, as with a database that
    stopped answering; every other query still works, so the worker could go on (and must not).
    Counts its sweeps for expired leases."""

    hang = False
    sweeps = 0

    async def heartbeat(self, owner: str, leases: Sequence[Lease], lease_seconds: float) -> tuple[set[str], set[str]]:
        if self.hang:
            await asyncio.Event().wait()
        return await super().heartbeat(owner, leases, lease_seconds)

    async def reclaim_expired(self, *args: Any, **kwargs: Any) -> tuple[list[tuple[Lease, RunRecord]], int]:
        self.sweeps += 1
        return await super().reclaim_expired(*args, **kwargs)


@asynccontextmanager
async def hanging_worker(database_url: str, registry: WorkflowRegistry,
                         lease_seconds: float) -> AsyncIterator[tuple[Worker, HangingHeartbeatStore]]:
    engine = create_engine(database_url)
    await migrate(engine)
    store = HangingHeartbeatStore(engine, InProcessBus())
    settings = Settings(database_url=database_url, lease_seconds=lease_seconds, heartbeat_seconds=0.3,
                        worker_poll_seconds=0.1, max_attempts=10)
    worker = Worker(store, registry, settings, Metrics())
    await worker.start()
    try:
        yield worker, store
    finally:
        store.hang = False
        await worker.stop()
        await engine.dispose()


async def eventually(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + PATIENCE
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.05)


async def test_worker_stops_runs_when_heartbeat_hangs(pg_database: str, tmp_path: Path) -> None:
    registry = WorkflowRegistry()
    journal_workflow.register(registry)
    # A long lease: its safety margin (a fifth) absorbs the scheduling delays of a loaded machine.
    async with hanging_worker(pg_database, registry, lease_seconds=10) as (worker, store):
        journal = tmp_path / "journal.txt"
        run, _ = await store.create(NewRun("t", "journal", {"journal": str(journal), "steps": 10_000,
                                                           "step_seconds": 0.2}, {}), max_active=None)

        async def stepping() -> bool:
            return any(r.finish is not None for r in step_runs(journal))

        await eventually("the run has finished a step", stepping)
        store.hang = True
        seen: dict[str, Any] = {}

        async def stopped_or_reclaimed() -> bool:
            seen.update(at=time.time(), executing=worker.executing, run=await store.get(None, run.id))
            return seen["executing"] == 0 or seen["run"].epoch > 1

        await eventually("the worker stops the run or claims it again", stopped_or_reclaimed)
        assert seen["run"].epoch == 1, "the worker claimed its run again while it still executed it"
        # Stopped by the worker's own clock, before the database would let another worker claim
        # it, and nothing of it ran after that.
        expires = seen["run"].lease_expires_at
        ran = step_runs(journal)
        assert seen["at"] < expires
        assert all(r.finish_wall is not None and r.finish_wall < expires for r in ran), ran
        last = max(r.start for r in ran)

        async def started_again() -> bool:
            return any(r.start > last for r in step_runs(journal))

        # Once the lease has expired the run may be claimed again (here by the same worker, whose
        # other queries work); that execution starts only after the first one stopped.
        await eventually("the run is claimed again", started_again)
        assert (await store.get(None, run.id)).epoch > 1
        assert not concurrent(step_runs(journal))


async def test_worker_never_claims_a_run_it_still_executes(pg_database: str) -> None:
    """A step that takes its time to stop keeps its execution alive past the lease's expiry;
    the worker's sweeps for expired leases must leave that run alone until it has stopped."""
    stop_asked, release = asyncio.Event(), asyncio.Event()
    starts: list[int] = []

    async def slow_to_stop() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:  # winds down only when released, as a killed subprocess might
                stop_asked.set()

    async def stubborn(ctx: RunContext, _inp: journal_workflow.JournalInput) -> None:
        starts.append(ctx.attempt)
        await ctx.step("slow-to-stop", slow_to_stop)

    registry = WorkflowRegistry()
    registry.workflow("stubborn", journal_workflow.JournalInput)(stubborn)
    async with hanging_worker(pg_database, registry, lease_seconds=2) as (worker, store):
        run, _ = await store.create(NewRun("t", "stubborn", {"journal": "-"}, {}), max_active=None)
        try:
            async def executing() -> bool:
                return bool(starts)

            await eventually("the run executes", executing)
            store.hang = True

            async def stopped_or_claimed_again() -> bool:
                return stop_asked.is_set() or len(starts) > 1

            await eventually("the worker stops the execution", stopped_or_claimed_again)
            assert starts == [1], "the worker claimed its run again while it still executed it"

            async def lease_expired() -> bool:
                return (await store.get(None, run.id)).lease_expires_at < time.time()

            await eventually("the lease has expired in the database", lease_expired)
            sweeps = store.sweeps

            async def swept_twice() -> bool:
                return store.sweeps >= sweeps + 2

            await eventually("the worker has swept for expired leases since", swept_twice)
            assert (await store.get(None, run.id)).epoch == 1 and starts == [1] and worker.executing == 1
            release.set()

            async def claimed_again() -> bool:
                return len(starts) == 2

            await eventually("the run is claimed again once its execution has stopped", claimed_again)
            assert starts == [1, 2]
        finally:
            release.set()  # else a failure would leave the worker unable to stop

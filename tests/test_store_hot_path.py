"""The store's write path as the worker uses it: the journal's batching, a connection the server
closed, a bus that cannot publish. On both databases unless marked."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from orchestrator.db import create_engine, migrate
from orchestrator.events import InProcessBus
from orchestrator.events.redis_bus import RedisBus
from orchestrator.runs.journal import Journal
from orchestrator.runs.store import Batch, Lease, NewRun, RunStore, StepWrite
from orchestrator.runs.context import RunContext
from orchestrator.runs.records import RunRecord


class CountingStore(RunStore):
    """Counts the journal's writes (one transaction each) and what each carried."""

    batches: list[Batch]

    async def write(self, lease: Lease, batch: Batch) -> Any:
        self.batches.append(batch)
        return await super().write(lease, batch)


@pytest.fixture
async def store(make_settings):
    engine = create_engine(make_settings().database_url)
    await migrate(engine)
    s = CountingStore(engine, InProcessBus())
    s.batches = []
    yield s
    await engine.dispose()


async def claimed(store: RunStore) -> tuple[Lease, RunRecord]:
    await store.create(NewRun(tenant="t", workflow="w", input=None, metadata={}), max_active=None)
    [(lease, run)] = await store.claim_queued("w1", 1, 30)
    return lease, run


async def _nothing(i: int) -> int:
    return i


async def test_a_step_that_waits_on_nothing_is_one_write_and_events_are_batched(store):
    lease, run = await claimed(store)
    ctx = RunContext(store, lease, run, {})
    for i in range(3):
        assert await ctx.step(f"s{i}", _nothing, i) == i
    assert len(store.batches) == 3  # start and checkpoint of each step share a transaction
    for i in range(100):
        await ctx.emit("progress", {"i": i})
    await ctx.journal.flush()
    assert len(store.batches) <= 5, len(store.batches)  # 100 emits, a few group commits
    events = await store.events(run.id, after=0, limit=1000)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.data["i"] for e in events if e.type == "progress"] == list(range(100))
    types = [e.type for e in events]
    assert types[:2] == ["run.queued", "run.started"]
    assert types[2:8] == ["step.started", "step.completed"] * 3
    steps = await store.steps(run.id)
    assert [(s.step_id, s.status, s.output) for s in steps] == [(i, "completed", i) for i in range(3)]
    await ctx.journal.close()


async def test_a_slow_step_is_seen_started_while_it_runs(store):
    lease, run = await claimed(store)
    ctx = RunContext(store, lease, run, {})
    release = asyncio.Event()

    async def slow() -> str:
        await release.wait()
        return "done"

    task = asyncio.create_task(ctx.step("slow", slow))
    for _ in range(200):
        if any(e.type == "step.started" for e in await store.events(run.id, after=0, limit=10)):
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("step.started not written while the step ran")
    [step] = await store.steps(run.id)
    assert step.status == "running"
    release.set()
    assert await task == "done"
    [step] = await store.steps(run.id)
    assert step.status == "completed" and step.output == "done"
    await ctx.journal.close()


async def test_a_replay_skips_emits_the_log_holds(store):
    lease, run = await claimed(store)
    ctx = RunContext(store, lease, run, {})
    for i in range(3):
        await ctx.emit("progress", {"i": i})
    await ctx.journal.flush()
    completed, keys = await store.replay_state(run.id)
    assert completed == {} and keys == {"emit:0", "emit:1", "emit:2"}
    replay = RunContext(store, lease, run, completed, logged_keys=keys)
    for i in range(4):
        await replay.emit("progress", {"i": i})
    await replay.journal.flush()
    progress = [e.data["i"] for e in await store.events(run.id, after=0, limit=100) if e.type == "progress"]
    assert progress == [0, 1, 2, 3]


async def test_a_lost_lease_in_a_background_write_stops_the_execution(store):
    lease, _run = await claimed(store)
    stale = Lease(lease.run_id, lease.epoch - 1, lease.owner)  # as if another worker had claimed it since
    lost = asyncio.Event()
    journal = Journal(store, stale, on_lost=lost.set)
    await journal.emit("x", {})
    await asyncio.wait_for(lost.wait(), 10)
    assert journal.queued == 1  # kept, not written: nothing of a stale owner reaches the log
    await journal.close()


@pytest.mark.postgres
async def test_connections_the_server_closed_are_replaced_without_a_failed_call(pg_database):
    """No ping on checkout: a connection PostgreSQL ended while it sat in the pool (a restart, an
    administrator) is seen closed by the driver and replaced, so the next calls succeed."""
    engine = create_engine(pg_database)
    await migrate(engine)
    store = RunStore(engine, InProcessBus())
    try:
        run, _ = await store.create(NewRun(tenant="t", workflow="w", input=None, metadata={}), max_active=5)
        await asyncio.gather(*(store.get("t", run.id) for _ in range(8)))  # several pooled connections
        dsn = pg_database.replace("postgresql+asyncpg://", "postgresql://")
        admin = await asyncpg.connect(dsn)
        try:
            ended = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        finally:
            await admin.close()
        assert ended >= 1
        await asyncio.sleep(0.2)  # the event loop reads each connection's end
        for _ in range(10):
            assert (await store.get("t", run.id)).id == run.id
        [(lease, _)] = await store.claim_queued("w1", 1, 30)
        await store.write(lease, Batch([], [StepWrite(0, "s", "completed", 1, 0.0, output=1)]))
        assert [s.output for s in await store.steps(run.id)] == [1]
    finally:
        await engine.dispose()


async def test_a_bus_that_cannot_publish_does_not_fail_a_committed_write(make_settings):
    engine = create_engine(make_settings().database_url)
    await migrate(engine)
    bus = RedisBus("redis://127.0.0.1:1/0")  # nothing listens there; never started
    store = RunStore(engine, bus)
    try:
        lease, run = await claimed(store)
        await store.write(lease, Batch([], [StepWrite(0, "s", "completed", 1, 0.0, output=1)]))
        for _ in range(100):
            if bus.dropped:
                break
            await asyncio.sleep(0.05)
        assert bus.dropped >= 1
        assert [s.output for s in await store.steps(run.id)] == [1]  # committed all the same
    finally:
        await bus.close()
        await engine.dispose()

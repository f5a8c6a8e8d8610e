"""The durable store on its own: leases, fencing, claims and the event log, on both databases."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import BaseModel

from orchestrator.db import create_engine, migrate
from orchestrator.events import InProcessBus
from orchestrator.metrics import Metrics
from orchestrator.runs.context import RunContext
from orchestrator.runs.states import RunStatus, can_transition
from orchestrator.runs.store import CONTROL_CHANNEL, Batch, LeaseLost, NewRun, RunStore, StepWrite, run_channel
from orchestrator.runs.worker import Worker
from orchestrator.workflows.registry import WorkflowRegistry


@pytest.fixture
async def store(make_settings):
    settings = make_settings()
    engine = create_engine(settings.database_url)
    await migrate(engine)
    await migrate(engine)  # applying twice is a no-op
    s = RunStore(engine, InProcessBus())
    yield s
    await engine.dispose()


async def new_run(store: RunStore, priority: int = 0, tenant: str = "t") -> str:
    run, created = await store.create(NewRun(tenant=tenant, workflow="echo", input={"message": 1}, metadata={},
                                             priority=priority), max_active=None)
    assert created
    return run.id


async def test_stale_owner_is_fenced_out(store):
    run_id = await new_run(store)
    [(lease1, _)] = await store.claim_queued("w1", 10, lease_seconds=0.2)
    await asyncio.sleep(0.3)
    reclaimed, expired = await store.reclaim_expired("w2", 10, lease_seconds=30, max_attempts=5)
    assert expired == 1 and [lease.run_id for lease, _ in reclaimed] == [run_id]
    lease2 = reclaimed[0][0]
    assert lease2.epoch == lease1.epoch + 1
    with pytest.raises(LeaseLost):
        await store.emit(lease1, "x", {})
    with pytest.raises(LeaseLost):
        await store.write(lease1, Batch([], [StepWrite(0, "s", "running", 1, 0.0)]))
    with pytest.raises(LeaseLost):
        await store.finish(lease1, RunStatus.SUCCEEDED, output=1)
    lost, _ = await store.heartbeat("w1", [lease1], 30)
    assert lost == {run_id}
    await store.finish(lease2, RunStatus.SUCCEEDED, output=2)
    run = await store.get("t", run_id)
    assert run.status is RunStatus.SUCCEEDED and run.output == 2 and run.attempt == 2
    events = await store.events(run_id, after=0, limit=100)
    assert [e.type for e in events] == ["run.queued", "run.started", "run.recovered", "run.succeeded"]


async def test_live_lease_is_not_reclaimed_and_heartbeat_extends_it(store):
    await new_run(store)
    [(lease, _)] = await store.claim_queued("w1", 10, lease_seconds=0.5)
    for _ in range(4):
        await asyncio.sleep(0.2)
        lost, _ = await store.heartbeat("w1", [lease], 0.5)
        assert not lost
        reclaimed, expired = await store.reclaim_expired("w2", 10, 0.5, 5)
        assert reclaimed == [] and expired == 0


async def test_claims_follow_priority_and_never_double_claim(store):
    low = await new_run(store, priority=0)
    high = await new_run(store, priority=10)
    ids = [await new_run(store) for _ in range(20)]
    [(first, _)] = await store.claim_queued("w0", 1, 30)
    assert first.run_id == high
    [(second, _)] = await store.claim_queued("w0", 1, 30)
    assert second.run_id == low  # same priority: oldest first
    results = await asyncio.gather(*(store.claim_queued(f"w{i}", 5, 30) for i in range(1, 6)))
    claimed = [lease.run_id for batch in results for lease, _ in batch]
    assert sorted(claimed) == sorted(ids)  # each run claimed by exactly one worker


async def test_op_key_makes_emits_idempotent_and_seq_gap_free(store):
    run_id = await new_run(store)
    [(lease, _)] = await store.claim_queued("w1", 1, 30)
    await asyncio.gather(*(store.emit(lease, "e", {"i": i}, op_key=f"emit:{i % 5}") for i in range(10)))
    events = await store.events(run_id, after=0, limit=100)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert len([e for e in events if e.type == "e"]) == 5


async def test_concurrent_limit_counts_only_active_runs(store):
    from orchestrator.errors import RateLimited

    for _ in range(2):
        await store.create(NewRun(tenant="lim", workflow="echo", input=None, metadata={}), max_active=2)
    with pytest.raises(RateLimited):
        await store.create(NewRun(tenant="lim", workflow="echo", input=None, metadata={}), max_active=2)
    runs, _ = await store.list_runs("lim", limit=10, after=None, status=None, workflow=None)
    assert len(runs) == 2  # the refused run left nothing behind
    await store.request_cancel("lim", runs[0].id)
    await store.create(NewRun(tenant="lim", workflow="echo", input=None, metadata={}), max_active=2)


class ClaimedBeforeWakeUpReturns(InProcessBus):
    """A bus whose wake-up for a new run returns only once a worker has claimed that run: the
    worst case for ``RunStore.create``, whose caller builds the 201 after it. A record read
    after the wake-up (or after the commit, on a slow path) would then say ``running``."""

    store: RunStore

    async def publish(self, channel: str, message: dict[str, Any]) -> None:
        if channel != CONTROL_CHANNEL or message.get("type") != "queued":
            return await super().publish(channel, message)
        run_id = message["run_id"]
        async with self.subscribe(run_channel(run_id)) as sub:  # before the read: no event falls between
            await super().publish(channel, message)
            while (await self.store.get(None, run_id)).status is RunStatus.QUEUED:
                await sub.get(timeout=1.0)


class NoInput(BaseModel):
    pass


async def test_create_returns_the_run_as_committed_even_when_a_worker_claims_it_at_once(make_settings):
    """Was: the run was read back after the workers' wake-up was published, so the 201 of a
    new run could already say ``running``. Here a real worker claims it before ``create``
    returns, every time."""
    settings = make_settings()
    engine = create_engine(settings.database_url)
    await migrate(engine)
    bus = ClaimedBeforeWakeUpReturns()
    store = bus.store = RunStore(engine, bus)
    registry = WorkflowRegistry()
    finish = asyncio.Event()

    @registry.workflow("hold", NoInput)
    async def hold(_ctx: RunContext, _inp: NoInput) -> None:
        await finish.wait()

    worker = Worker(store, registry, settings, Metrics())
    await worker.start()
    try:
        for _ in range(3):
            run, created = await store.create(NewRun(tenant="t", workflow="hold", input={}, metadata={}),
                                              max_active=None)
            assert created
            assert (run.status, run.attempt, run.epoch, run.last_seq) == (RunStatus.QUEUED, 0, 0, 1)
            assert run.started_at is None and run.lease_owner is None
            now = await store.get("t", run.id)
            assert now.status is RunStatus.RUNNING and now.lease_owner == worker.id  # claimed meanwhile
    finally:
        finish.set()
        await worker.stop()
        await engine.dispose()


def test_state_machine() -> None:
    assert can_transition(RunStatus.QUEUED, RunStatus.RUNNING)
    assert can_transition(RunStatus.RUNNING, RunStatus.WAITING)
    assert can_transition(RunStatus.WAITING, RunStatus.RUNNING)
    assert can_transition(RunStatus.RUNNING, RunStatus.CANCELLING)
    assert can_transition(RunStatus.CANCELLING, RunStatus.CANCELLED)
    assert not can_transition(RunStatus.SUCCEEDED, RunStatus.RUNNING)
    assert not can_transition(RunStatus.QUEUED, RunStatus.SUCCEEDED)
    assert all(s.terminal for s in (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.TIMED_OUT))

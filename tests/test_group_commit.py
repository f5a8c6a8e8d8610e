"""Group commit of submissions: the batching itself (logic), then what it must keep on a real
PostgreSQL: the tenant's active-runs limit, Idempotency-Key replays within one batch, and one
tenant's bad row failing only its own submission."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence

import pytest

from orchestrator.db import create_engine, migrate
from orchestrator.errors import Conflict, RateLimited
from orchestrator.events import InProcessBus
from orchestrator.group_commit import GroupCommit
from orchestrator.runs.states import RunStatus
from orchestrator.runs.store import NewRun, RunStore

# ---- the batching, without a database ---------------------------------------------------------


class Recorder:
    """A flush that records its batches and holds each until released."""

    def __init__(self) -> None:
        self.batches: list[tuple[Hashable, list[int]]] = []
        self.release = asyncio.Event()

    async def __call__(self, key: Hashable, items: Sequence[int]) -> list[int | BaseException]:
        self.batches.append((key, list(items)))
        await self.release.wait()
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]


async def test_the_first_write_goes_alone_and_what_arrives_meanwhile_goes_next_as_one_batch():
    flush = Recorder()
    gc: GroupCommit[int, int] = GroupCommit(flush, max_batch=3)
    first = asyncio.create_task(gc.submit("k", 1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert flush.batches == [("k", [1])]  # no waiting for company when quiet
    rest = [asyncio.create_task(gc.submit("k", i)) for i in (2, 3, 4, 5)]
    other = asyncio.create_task(gc.submit("other", 7))  # another key does not wait on "k"
    await asyncio.sleep(0.01)
    assert ("other", [7]) in flush.batches
    assert [b for k, b in flush.batches if k == "k"] == [[1]]  # one batch in flight per key
    flush.release.set()
    assert await first == 10
    assert await asyncio.gather(*rest) == [20, 30, 40, 50]
    assert await other == 70
    assert [b for k, b in flush.batches if k == "k"] == [[1], [2, 3, 4], [5]]  # at most max_batch
    assert gc.batches == 4 and gc.items == 6


async def test_results_and_errors_reach_their_own_callers_and_a_cancelled_caller_does_not_stop_the_batch():
    flush = Recorder()
    gc: GroupCommit[int, int] = GroupCommit(flush)
    blocker = asyncio.create_task(gc.submit("k", 0))
    await asyncio.sleep(0)
    a, b, c = (asyncio.create_task(gc.submit("k", i)) for i in (1, -2, 3))
    await asyncio.sleep(0)
    b.cancel()  # its request went away before its batch was written
    flush.release.set()
    assert await blocker == 0
    assert await a == 10 and await c == 30
    with pytest.raises(asyncio.CancelledError):
        await b
    assert flush.batches[-1] == ("k", [1, -2, 3])  # it was written with the others all the same
    d = asyncio.create_task(gc.submit("k", -4))
    with pytest.raises(ValueError, match="bad -4"):
        await d


async def test_a_flush_that_raises_fails_its_batch_only():
    calls = 0

    async def flaky(key: Hashable, items: Sequence[int]) -> list[int | BaseException]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("connection reset")
        return list(items)

    gc: GroupCommit[int, int] = GroupCommit(flaky)
    with pytest.raises(OSError):
        await gc.submit(None, 1)
    assert await gc.submit(None, 2) == 2


# ---- on PostgreSQL ------------------------------------------------------------------------


@pytest.fixture
async def pg_store(pg_database):
    engine = create_engine(pg_database)
    await migrate(engine)
    yield RunStore(engine, InProcessBus())
    await engine.dispose()


def new_run(tenant: str = "t", *, key: str | None = None, body: str = "a", priority: int = 0) -> NewRun:
    return NewRun(tenant=tenant, workflow="echo", input={"x": body}, metadata={}, priority=priority,
                  idempotency_key=key, request_hash=body)


async def test_concurrent_submissions_of_a_limited_tenant_admit_exactly_the_limit_in_few_batches(pg_store):
    results = await asyncio.gather(*(pg_store.create(new_run(), max_active=5) for _ in range(40)),
                                   return_exceptions=True)
    created = [r for r in results if isinstance(r, tuple)]
    refused = [r for r in results if isinstance(r, RateLimited)]
    assert len(created) == 5 and len(refused) == 35, results
    assert all(c for _, c in created) and all(r.status is RunStatus.QUEUED for r, _ in created)
    runs, _ = await pg_store.list_runs("t", limit=100, after=None, status=None, workflow=None)
    assert sorted(r.id for r in runs) == sorted(r.id for r, _ in created)  # refused ones left nothing
    for run in runs:  # and each admitted run has its first event
        assert [e.type for e in await pg_store.events(run.id, after=0, limit=10)] == ["run.queued"]
    assert pg_store._creates.batches < 40  # they were grouped
    # another tenant is not held to "t"'s limit, even in the same instant
    other = await asyncio.gather(*(pg_store.create(new_run("u"), max_active=5) for _ in range(5)))
    assert all(c for _, c in other)


async def test_one_idempotency_key_submitted_many_times_at_once_makes_one_run(pg_store):
    for limit in (None, 100):
        key = f"k-{limit}"
        results = await asyncio.gather(*(pg_store.create(new_run(key=key), max_active=limit) for _ in range(12)))
        assert len({run.id for run, _ in results}) == 1
        assert sum(created for _, created in results) == 1
        with pytest.raises(Conflict):  # the same key with another body
            await pg_store.create(new_run(key=key, body="b"), max_active=limit)
    runs, _ = await pg_store.list_runs("t", limit=100, after=None, status=None, workflow=None)
    assert len(runs) == 2


async def test_a_row_the_database_rejects_fails_only_its_own_submission(pg_store):
    gate = asyncio.Event()
    real = pg_store._create_batch

    async def held(key, items):  # hold the first batch so that the next ones group up behind it
        await gate.wait()
        return await real(key, items)

    pg_store._creates._flush = held
    first = asyncio.create_task(pg_store.create(new_run(), max_active=None))
    await asyncio.sleep(0.01)
    batch = [asyncio.create_task(pg_store.create(new_run(tenant=f"t{i}", priority=2**40 if i == 2 else 0),
                                                 max_active=None)) for i in range(5)]
    await asyncio.sleep(0.01)
    gate.set()
    await first
    results = await asyncio.gather(*batch, return_exceptions=True)
    assert isinstance(results[2], Exception) and "int32" in str(results[2])
    assert all(isinstance(r, tuple) and r[1] for i, r in enumerate(results) if i != 2), results
    assert pg_store._creates.batches >= 2


# ---- the request-rate limit in Redis, checked in groups ---------------------------------------


async def test_a_burst_of_rate_limit_checks_admits_exactly_the_bucket_in_order(redis_url):
    import uuid

    from orchestrator.quotas import RedisRateLimiter
    from orchestrator.settings import TenantLimits

    limiter = RedisRateLimiter(redis_url)
    try:
        tenant = f"t-{uuid.uuid4().hex}"
        limits = TenantLimits(requests_per_second=0.5, burst=10)  # one more every 2 s
        waits = await asyncio.gather(*(limiter.check(tenant, limits) for _ in range(30)))
        assert waits[:10] == [0.0] * 10  # the burst, to the first ten callers
        assert all(1.0 < w <= 2.0 for w in waits[10:]), waits  # the rest told to wait for a token
        assert limiter._checks.batches < 30
        assert await limiter.check(tenant, limits) > 1.0  # the refused ones took nothing
        other = await limiter.check(f"u-{uuid.uuid4().hex}", limits)
        assert other == 0.0  # another tenant's bucket
    finally:
        await limiter.close()

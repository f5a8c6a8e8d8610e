"""Durable run state: every read and write of runs, steps and the event log.

Writes made by the worker that owns a run carry its fencing ``epoch``: each one
is an ``UPDATE ... WHERE epoch = :epoch`` and raises ``LeaseLost`` when another
worker has claimed the run since, so a stale owner can never overwrite a newer
one. Events are numbered per run from ``runs.last_seq`` inside the same
transaction that appends them, which makes the sequence gap-free.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import asyncpg
from sqlalchemy import Table, func, insert, select, text, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from orchestrator.runs import pg
from orchestrator.db.engine import driver_closed

from orchestrator.db.models import Run, RunEvent, RunStep, Worker
from orchestrator.errors import Conflict, NotFound, RateLimited
from orchestrator.events.bus import EventBus
from orchestrator.ids import new_id
from orchestrator.group_commit import GroupCommit
from orchestrator.runs.records import EventRecord, RunRecord, StepRecord
from orchestrator.runs.states import ACTIVE, FINAL_EVENT, LEASED, RunStatus
from orchestrator.settings import QueueLimits

_ACTIVE_VALUES = [s.value for s in ACTIVE]
_LEASED_VALUES = [s.value for s in LEASED]
RESUMABLE = frozenset({RunStatus.FAILED.value, RunStatus.CANCELLED.value, RunStatus.TIMED_OUT.value})
# asyncpg's errors for a connection that is gone: the statement may or may not have run.
_CONNECTION_ERRORS = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, ConnectionError, OSError)

# Core tables, not ORM classes: the store writes with statements (fenced UPDATEs, RETURNING).
# ``__table__`` is typed as any FromClause; for a declarative class it is always a Table.
runs_t = cast(Table, Run.__table__)
events_t = cast(Table, RunEvent.__table__)
steps_t = cast(Table, RunStep.__table__)
workers_t = cast(Table, Worker.__table__)

CONTROL_CHANNEL = "control"
# A submission waiting for its batch (``RunStore.create``): the request, its run id, its time.
_NewRunItem = tuple["NewRun", str, float]


def run_channel(run_id: str) -> str:
    return f"run:{run_id}"


def request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class LeaseLost(Exception):
    """This worker no longer owns the run: another claimed it with a newer epoch."""


@dataclass(frozen=True)
class Lease:
    run_id: str
    epoch: int
    owner: str


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """An event an execution has produced and not yet written; it gets its ``seq`` when written."""

    type: str
    data: dict[str, Any]
    op_key: str | None = None
    created_at: float = 0.0


@dataclass(frozen=True, slots=True)
class StepWrite:
    """A step's row as it should be after the write (upserted by ``(run_id, step_id)``)."""

    step_id: int
    name: str
    status: str  # running | completed | failed
    attempt: int
    started_at: float
    output: Any = None
    error: dict[str, Any] | None = None
    finished_at: float | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a run ended; written with its final event and the lease cleared."""

    status: RunStatus
    output: Any = None
    error: dict[str, Any] | None = None


@dataclass
class Batch:
    """Writes of one execution that go to the database together, in one fenced transaction."""

    events: list[PendingEvent]
    steps: list[StepWrite]
    outcome: Outcome | None = None


@dataclass
class NewRun:
    tenant: str
    workflow: str
    input: Any
    metadata: dict[str, Any]
    priority: int = 0
    timeout_seconds: float | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    # A fork: the new run starts with the completed checkpoints of this run's steps before the step
    forked_from: str | None = None
    forked_from_step: int | None = None
    queue: str = "default"


class LivenessLock:
    """A worker's liveness lock and the connection that holds it (see ``pg.LIVENESS_LOCK``)."""

    def __init__(self, conn: AsyncConnection, driver: asyncpg.Connection) -> None:
        self._conn = conn
        self._driver = driver

    @property
    def lost(self) -> bool:
        return driver_closed(self._driver)

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` as soon as the driver sees the session end."""
        self._driver.add_termination_listener(lambda _conn: callback())

    async def close(self) -> None:
        """End the session, and with it the lock."""
        try:
            await self._conn.invalidate()
        finally:
            await self._conn.close()


class RunStore:
    """Run persistence plus bus notifications after each commit."""

    def __init__(self, engine: AsyncEngine, bus: EventBus, queues: Mapping[str, QueueLimits] | None = None) -> None:
        self.engine = engine
        self.bus = bus
        self.dialect = engine.dialect.name
        # The named queues with a limit: their runs are claimed under it (``_claim_limited``)
        self.limited = {name: q for name, q in (queues or {}).items()
                        if q.concurrency is not None or q.tenant_concurrency is not None}
        # SQLite allows one writer at a time and makes the others retry with sleeps (seconds
        # at the tail under load), and it has no SKIP LOCKED for claims. One process owns a
        # SQLite file, so queueing its write transactions on a lock is both faster and fair.
        self._write_lock = asyncio.Lock() if self.dialect == "sqlite" else contextlib.nullcontext()
        # Submissions on PostgreSQL: one statement a batch, one batch in flight per tenant with a limit
        self._creates: GroupCommit[_NewRunItem, tuple[RunRecord, bool]] = GroupCommit(self._create_batch)

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction (serialised in-process on SQLite)."""
        async with self._write_lock, self.engine.begin() as conn:
            yield conn

    # ---- helpers -----------------------------------------------------------------

    async def _append(
        self,
        conn: AsyncConnection,
        run_id: str,
        type_: str,
        data: dict[str, Any],
        *,
        epoch: int | None = None,
        now: float | None = None,
        values: dict[str, Any] | None = None,
    ) -> EventRecord:
        """Append one event (and apply ``values`` to the run row) in the caller's transaction.

        With ``epoch`` the write is fenced. (A workflow's events, keyed for replay, go through
        ``write``.)
        """
        now = time.time() if now is None else now
        cond = [runs_t.c.id == run_id]
        if epoch is not None:
            cond.append(runs_t.c.epoch == epoch)
        stmt = (
            update(runs_t)
            .where(*cond)
            .values(last_seq=runs_t.c.last_seq + 1, updated_at=now, **(values or {}))
            .returning(runs_t.c.last_seq)
        )
        seq = (await conn.execute(stmt)).scalar_one_or_none()
        if seq is None:
            if epoch is not None:
                raise LeaseLost(run_id)
            raise NotFound(f"No run with id {run_id!r}.", code="run_not_found", param="run_id")
        await conn.execute(
            insert(events_t).values(run_id=run_id, seq=seq, type=type_, data=data, created_at=now)
        )
        return EventRecord(run_id=run_id, seq=seq, type=type_, data=data, created_at=now)

    @contextlib.asynccontextmanager
    async def _raw(self) -> AsyncIterator[asyncpg.Connection]:
        """The asyncpg connection under one of the pool's (PostgreSQL only), for the hot path.

        A statement sent here bypasses SQLAlchemy, which never learns that the connection
        broke: one that fails with a connection error is invalidated, so the pool opens a
        new one instead of handing the broken one out again.
        """
        async with self.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            driver = cast(asyncpg.Connection, raw.driver_connection)
            try:
                yield driver
            except BaseException as exc:
                # a cancelled statement may still be running on the server: not for the next user
                if isinstance(exc, (*_CONNECTION_ERRORS, asyncio.CancelledError)) or driver_closed(driver):
                    await conn.invalidate()
                raise

    @contextlib.asynccontextmanager
    async def _raw_transaction(self, begin: str) -> AsyncIterator[asyncpg.Connection]:
        """``_raw`` inside a transaction opened by ``begin`` (BEGIN and what must come with it, in
        one round trip), committed on success and rolled back on any error."""
        async with self._raw() as db:
            await db.execute(begin)
            try:
                yield db
            except BaseException:
                if not db.is_closed():
                    await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")

    async def _publish(self, events: Sequence[EventRecord | None]) -> None:
        """Tell live readers (SSE, long polls) about committed events, in one bus round trip."""
        await self.bus.publish_many([(run_channel(ev.run_id), ev.message()) for ev in events if ev is not None])

    # ---- API side ------------------------------------------------------------------

    async def create(self, new: NewRun, *, max_active: int | None) -> tuple[RunRecord, bool]:
        """Insert a queued run. Returns ``(run, created)``; ``created`` is False for an idempotent replay.

        A created run is returned as it was committed, ``queued``: the caller knows every value
        it inserted, and the wake-up for the workers is published only after the commit. A
        response built from a read after the commit could already say ``running`` (or even
        ``succeeded``), since any worker may claim the run as soon as it is committed. A replay
        returns the original run as it is now.

        On PostgreSQL, concurrent submissions are group-committed (``_create_batch``): one
        statement inserts a batch, and with ``max_active`` the tenant's active runs are counted
        under its advisory lock, held from BEGIN to COMMIT across that one statement. A tenant's
        submissions queue for one round trip a batch, not one each; other tenants' not at all.
        """
        now = time.time()
        run_id = new_id("run")
        try:
            if self.dialect == "postgresql" and new.forked_from is None:
                run, created = await self._creates.submit(
                    (new.tenant, max_active) if max_active is not None else None, (new, run_id, now))
                if created:
                    return run, True
            else:
                data: dict[str, Any] = {"status": "queued", "workflow": new.workflow}
                if new.forked_from is not None:
                    data.update(forked_from=new.forked_from, from_step=new.forked_from_step)
                run = await self._create_generic(new, run_id, now, max_active, data)
                await self.bus.publish(CONTROL_CHANNEL, {"type": "queued", "run_id": run_id})
                return run, True
        except (IntegrityError, asyncpg.UniqueViolationError):
            if new.idempotency_key is None:
                raise
        return await self._replay(new), False

    async def _replay(self, new: NewRun) -> RunRecord:
        """The run an earlier submission with ``new``'s Idempotency-Key created (409 for another body)."""
        assert new.idempotency_key is not None
        existing = await self._by_idempotency_key(new.tenant, new.idempotency_key)
        if existing is None:  # pragma: no cover - deleted between the two statements
            raise Conflict("This Idempotency-Key's run was deleted meanwhile; retry.",
                           code="idempotency_key_reused", param="Idempotency-Key")
        if existing.request_hash != new.request_hash:
            raise Conflict(
                "This Idempotency-Key was already used with a different request body.",
                code="idempotency_key_reused", param="Idempotency-Key",
            )
        return existing

    @staticmethod
    def _too_many(active: int, max_active: int) -> RateLimited:
        return RateLimited(f"Tenant has {active} active runs; the limit is {max_active}.",
                           retry_after=1.0, code="too_many_concurrent_runs")

    async def _create_batch(self, key: Hashable, items: Sequence[_NewRunItem]
                            ) -> list[tuple[RunRecord, bool] | BaseException]:
        """Write one batch of submissions (``GroupCommit``'s flush; ``key``: (tenant, limit) or None).

        Each submission gets its run (``created`` True), ``(None-run, False)`` for a key to look up
        as a replay, or the ``RateLimited`` that refused it. A batch the database rejects as a
        whole for its data (not for the connection) is written again one submission at a time,
        so one tenant's bad row can fail only its own request.
        """
        tenant, max_active = key if isinstance(key, tuple) else (None, None)
        cols: list[list[Any]] = [[] for _ in range(11)]
        for new, run_id, now in items:
            for col, value in zip(cols, (
                    run_id, new.tenant, new.workflow, _json(new.input), _json(new.metadata), new.priority,
                    new.idempotency_key, new.request_hash, new.timeout_seconds, now, new.queue), strict=True):
                col.append(value)
        args = (*cols, max_active, tenant)
        try:
            if max_active is None:
                async with self._raw() as db:
                    rows = await db.fetch(pg.CREATE_MANY, *args)
            else:
                async with self._raw_transaction(pg.tenant_lock_sql(tenant or "")) as db:
                    rows = await db.fetch(pg.CREATE_MANY, *args)
        except asyncpg.PostgresError as exc:
            if len(items) == 1 or isinstance(exc, _CONNECTION_ERRORS):
                raise
            out: list[tuple[RunRecord, bool] | BaseException] = []
            for item in items:
                try:
                    out += await self._create_batch(key, [item])
                except Exception as one:
                    out.append(one)
            return out
        out = []
        for (new, run_id, now), row in zip(items, rows, strict=True):
            if row["inserted"]:
                out.append((_queued_record(new, run_id, now), True))
            elif max_active is not None and row["before"] is not None and row["before"] >= max_active:
                out.append(self._too_many(row["before"], max_active))
            elif new.idempotency_key is None:  # pragma: no cover - an id collision
                out.append(RuntimeError(f"run id {run_id} collided; retry"))
            else:
                out.append((_queued_record(new, run_id, now), False))  # a known key: the caller replays it
        inserted = [item[1] for item, row in zip(items, rows, strict=True) if row["inserted"]]
        if inserted:  # one wake-up a batch: a worker claims every queued run it has room for
            await self.bus.publish(CONTROL_CHANNEL, {"type": "queued", "run_id": inserted[0], "count": len(inserted)})
        return out

    async def _lock_tenant(self, conn: AsyncConnection, tenant: str) -> None:
        """Serialise the tenant's admissions until this transaction ends (SQLite: its write lock does)."""
        if self.dialect == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": pg.tenant_lock_key(tenant)})

    async def _check_active(self, conn: AsyncConnection, tenant: str, max_active: int | None) -> None:
        if max_active is None:
            return
        await self._lock_tenant(conn, tenant)
        active = (await conn.execute(
            select(func.count()).select_from(runs_t).where(runs_t.c.tenant == tenant,
                                                           runs_t.c.status.in_(_ACTIVE_VALUES))
        )).scalar_one()
        if active >= max_active:
            raise self._too_many(active, max_active)

    async def _create_generic(self, new: NewRun, run_id: str, now: float, max_active: int | None,
                              data: dict[str, Any]) -> RunRecord:
        async with self._write() as conn:
            await self._check_active(conn, new.tenant, max_active)
            copied = await self._fork_steps(conn, new) if new.forked_from is not None else []
            row = (await conn.execute(
                insert(runs_t).values(
                    id=run_id, tenant=new.tenant, workflow=new.workflow, status=RunStatus.QUEUED.value,
                    input=new.input, metadata=new.metadata, priority=new.priority,
                    idempotency_key=new.idempotency_key, request_hash=new.request_hash,
                    timeout_seconds=new.timeout_seconds, created_at=now, updated_at=now,
                    attempt=0, epoch=0, cancel_requested=False, last_seq=1,
                    forked_from=new.forked_from, forked_from_step=new.forked_from_step, queue=new.queue,
                ).returning(*runs_t.c)
            )).one()
            if copied:
                await conn.execute(insert(steps_t), [{**step, "run_id": run_id} for step in copied])
            await conn.execute(insert(events_t).values(
                run_id=run_id, seq=1, type="run.queued", data=data, created_at=now))
            return RunRecord.from_row(row)

    async def _fork_steps(self, conn: AsyncConnection, new: NewRun) -> list[dict[str, Any]]:
        """The checkpoints a fork starts from: every step before ``forked_from_step``, all completed."""
        upto = new.forked_from_step or 0
        rows = (await conn.execute(select(steps_t).where(
            steps_t.c.run_id == new.forked_from, steps_t.c.step_id < upto, steps_t.c.status == "completed"
        ).order_by(steps_t.c.step_id))).all()
        done = [r.step_id for r in rows]
        if done != list(range(upto)):
            missing = min(set(range(upto)) - set(done))
            raise Conflict(f"Step {missing} of run {new.forked_from!r} has no completed checkpoint to fork from; "
                           f"from_step may be at most {missing}.", code="step_not_completed", param="from_step")
        return [{k: v for k, v in r._mapping.items() if k != "run_id"} for r in rows]

    async def resume(self, tenant: str, run_id: str, *, max_active: int | None) -> RunRecord:
        """Queue a failed, cancelled or timed-out run again; it replays its completed steps.

        Its timeout starts over; its attempts go on counting. A run in any other state is a
        ``409 run_not_resumable``: a finished success has nothing left to do, an active run is
        already on its way.
        """
        now = time.time()
        async with self._write() as conn:
            await self._check_active(conn, tenant, max_active)
            stmt = select(runs_t.c.status).where(runs_t.c.id == run_id, runs_t.c.tenant == tenant)
            if self.dialect == "postgresql":
                stmt = stmt.with_for_update()
            status = (await conn.execute(stmt)).scalar_one_or_none()
            if status is None:
                raise NotFound(f"No run with id {run_id!r}.", code="run_not_found", param="run_id")
            if status not in RESUMABLE:
                raise Conflict(f"Run {run_id!r} is {status}; only a failed, cancelled or timed-out run can be "
                               f"resumed.", code="run_not_resumable", param="run_id")
            ev = await self._append(conn, run_id, "run.resumed", {"status": "queued", "from_status": status},
                                    now=now, values={
                                        "status": RunStatus.QUEUED.value, "output": None, "error": None,
                                        "finished_at": None, "cancel_requested": False, "deadline_at": None,
                                        "lease_owner": None, "lease_expires_at": None})
        await self._publish([ev])
        await self.bus.publish(CONTROL_CHANNEL, {"type": "queued", "run_id": run_id})
        return await self.get(tenant, run_id)

    async def _by_idempotency_key(self, tenant: str, key: str) -> RunRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(
                select(runs_t).where(runs_t.c.tenant == tenant, runs_t.c.idempotency_key == key)
            )).first()
        return RunRecord.from_row(row) if row else None

    async def get(self, tenant: str | None, run_id: str) -> RunRecord:
        if self.dialect == "postgresql":
            async with self._raw() as db:
                if tenant is None:
                    found = await db.fetchrow(pg.GET, run_id)
                else:
                    found = await db.fetchrow(pg.GET_FOR_TENANT, run_id, tenant)
            if found is None:
                raise NotFound(f"No run with id {run_id!r}.", code="run_not_found", param="run_id")
            return RunRecord.from_mapping(found)
        cond = [runs_t.c.id == run_id]
        if tenant is not None:
            cond.append(runs_t.c.tenant == tenant)
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(runs_t).where(*cond))).first()
        if row is None:
            raise NotFound(f"No run with id {run_id!r}.", code="run_not_found", param="run_id")
        return RunRecord.from_row(row)

    async def list_runs(
        self, tenant: str, *, limit: int, after: str | None, status: Collection[RunStatus] | None,
        workflow: str | None,
    ) -> tuple[list[RunRecord], bool]:
        """Newest first; ``after`` is the id of the last run of the previous page."""
        cond = [runs_t.c.tenant == tenant]
        if after is not None:
            cond.append(runs_t.c.id < after)
        if status:
            cond.append(runs_t.c.status.in_([s.value for s in status]))
        if workflow is not None:
            cond.append(runs_t.c.workflow == workflow)
        stmt = select(runs_t).where(*cond).order_by(runs_t.c.id.desc()).limit(limit + 1)
        async with self.engine.connect() as conn:
            runs = [RunRecord.from_row(r) for r in await conn.execute(stmt)]
        return runs[:limit], len(runs) > limit

    async def request_cancel(self, tenant: str, run_id: str) -> RunRecord:
        """Idempotent: a queued run is cancelled at once, a leased one moves to ``cancelling``."""
        run = await self.get(tenant, run_id)
        status = run.status
        events: list[EventRecord | None] = []
        if status is RunStatus.QUEUED:
            now = time.time()
            async with self._write() as conn:
                res = await conn.execute(
                    update(runs_t).where(runs_t.c.id == run_id, runs_t.c.status == RunStatus.QUEUED.value)
                    .values(status=RunStatus.CANCELLED.value, cancel_requested=True, finished_at=now, updated_at=now,
                            error={"code": "cancelled", "message": "Cancelled before it started."})
                )
                if res.rowcount == 1:
                    events.append(await self._append(conn, run_id, "run.cancelled", {"status": "cancelled"}, now=now))
            if not events:  # claimed meanwhile: cancel the running one
                return await self.request_cancel(tenant, run_id)
        elif status in (RunStatus.RUNNING, RunStatus.WAITING):
            async with self._write() as conn:
                res = await conn.execute(
                    update(runs_t)
                    .where(runs_t.c.id == run_id,
                           runs_t.c.status.in_([RunStatus.RUNNING.value, RunStatus.WAITING.value]))
                    .values(status=RunStatus.CANCELLING.value, cancel_requested=True)
                )
                if res.rowcount == 1:
                    events.append(await self._append(conn, run_id, "run.cancelling", {"status": "cancelling"}))
            if not events:
                return await self.request_cancel(tenant, run_id)
            await self.bus.publish(CONTROL_CHANNEL, {"type": "cancel", "run_id": run_id, "owner": run.lease_owner})
        await self._publish(events)
        return await self.get(tenant, run_id)

    async def events(self, run_id: str, *, after: int, limit: int) -> list[EventRecord]:
        stmt = (
            select(events_t.c.run_id, events_t.c.seq, events_t.c.type, events_t.c.data, events_t.c.created_at)
            .where(events_t.c.run_id == run_id, events_t.c.seq > after)
            .order_by(events_t.c.seq)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [EventRecord(run_id=r.run_id, seq=r.seq, type=r.type, data=r.data, created_at=r.created_at)
                    for r in await conn.execute(stmt)]

    async def steps(self, run_id: str) -> list[StepRecord]:
        stmt = select(steps_t).where(steps_t.c.run_id == run_id).order_by(steps_t.c.step_id)
        async with self.engine.connect() as conn:
            return [StepRecord.from_row(r) for r in await conn.execute(stmt)]

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(select(1))

    # ---- worker side ---------------------------------------------------------------

    async def claim_queued(self, owner: str, limit: int, lease_seconds: float) -> list[tuple[Lease, RunRecord]]:
        """Claim up to ``limit`` queued runs, highest priority then oldest first; those of queues
        with limits first, within them (``_claim_limited``)."""
        now = time.time()
        claimed = await self._claim_limited(owner, limit, lease_seconds, now) if self.limited else []
        if len(claimed) < limit:
            claimed += await self._claim_unlimited(owner, limit - len(claimed), lease_seconds, now)
        return claimed

    async def _claim_unlimited(self, owner: str, limit: int, lease_seconds: float,
                               now: float) -> list[tuple[Lease, RunRecord]]:
        limited = list(self.limited)
        if self.dialect == "postgresql":
            async with self._raw() as db:
                rows = await db.fetch(pg.CLAIM, limit, owner, now, lease_seconds, limited)
            return await self._claimed_pg(rows, owner, now)
        stmt = (
            select(runs_t.c.id, runs_t.c.epoch)
            .where(runs_t.c.status == RunStatus.QUEUED.value, runs_t.c.queue.not_in(limited))
            .order_by(runs_t.c.priority.desc(), runs_t.c.id)
            .limit(limit)
        )
        async with self._write() as conn:
            ids = [(run_id, epoch) for run_id, epoch in (await conn.execute(stmt)).all()]
            return await self._claim_ids(conn, ids, owner, now, lease_seconds)

    async def _claimed_pg(self, rows: Sequence[Any], owner: str, now: float) -> list[tuple[Lease, RunRecord]]:
        claimed = [(Lease(r["id"], r["epoch"], owner), RunRecord.from_mapping(r)) for r in rows]
        await self._publish([EventRecord(
            run_id=run.id, seq=run.last_seq, type="run.started",
            data={"status": "running", "attempt": run.attempt, "worker": owner}, created_at=now,
        ) for _, run in claimed])
        return claimed

    async def _claim_ids(self, conn: AsyncConnection, ids: Sequence[tuple[str, int]], owner: str, now: float,
                         lease_seconds: float) -> list[tuple[Lease, RunRecord]]:
        """Claim these queued runs (SQLite: inside the caller's write transaction)."""
        claimed: list[tuple[Lease, RunRecord]] = []
        events: list[EventRecord | None] = []
        for run_id, epoch in ids:
            row = (await conn.execute(
                update(runs_t)
                .where(runs_t.c.id == run_id, runs_t.c.status == RunStatus.QUEUED.value, runs_t.c.epoch == epoch)
                .values(status=RunStatus.RUNNING.value, epoch=epoch + 1, lease_owner=owner,
                        lease_expires_at=now + lease_seconds, attempt=runs_t.c.attempt + 1,
                        started_at=func.coalesce(runs_t.c.started_at, now), updated_at=now,
                        deadline_at=func.coalesce(runs_t.c.deadline_at, runs_t.c.timeout_seconds + now))
                .returning(*runs_t.c)
            )).first()
            if row is None:
                continue
            run = RunRecord.from_row(row)
            lease = Lease(run_id, epoch + 1, owner)
            events.append(await self._append(conn, run_id, "run.started", {
                "status": "running", "attempt": run.attempt, "worker": owner}, epoch=lease.epoch, now=now))
            claimed.append((lease, run))
        await self._publish(events)
        return claimed

    async def _claim_limited(self, owner: str, limit: int, lease_seconds: float,
                             now: float) -> list[tuple[Lease, RunRecord]]:
        """Claim from the queues with limits, within them, tenants taking turns (``pg.CLAIM_LIMITED``).

        One claimer at a time counts the free slots (on PostgreSQL, whoever holds
        ``QUEUE_CLAIM_LOCK``; a replica that finds it taken claims from the other queues and tries
        again on its next pass).
        """
        names = list(self.limited)
        conc = [self.limited[n].concurrency for n in names]
        tconc = [self.limited[n].tenant_concurrency for n in names]
        if self.dialect == "postgresql":
            rows = []
            async with self._raw_transaction("BEGIN") as db:
                if await db.fetchval("SELECT pg_try_advisory_xact_lock($1)", pg.QUEUE_CLAIM_LOCK):
                    rows = await db.fetch(pg.CLAIM_LIMITED, limit, owner, now, lease_seconds, names, conc, tconc,
                                          _LEASED_VALUES)
            return await self._claimed_pg(rows, owner, now)
        async with self._write() as conn:
            running: dict[tuple[str, str], int] = {}
            for queue, tenant, n in await conn.execute(
                select(runs_t.c.queue, runs_t.c.tenant, func.count()).where(
                    runs_t.c.status.in_(_LEASED_VALUES), runs_t.c.queue.in_(names)
                ).group_by(runs_t.c.queue, runs_t.c.tenant)
            ):
                running[(queue, tenant)] = n
            queued = (await conn.execute(
                select(runs_t.c.id, runs_t.c.epoch, runs_t.c.queue, runs_t.c.tenant, runs_t.c.priority)
                .where(runs_t.c.status == RunStatus.QUEUED.value, runs_t.c.queue.in_(names))
                .order_by(runs_t.c.priority.desc(), runs_t.c.id)
            )).all()
            picked = pick_fair(queued, running, self.limited, limit)
            return await self._claim_ids(conn, picked, owner, now, lease_seconds)

    async def reclaim_expired(
        self, owner: str, limit: int, lease_seconds: float, max_attempts: int, *, exclude: Collection[str] = ()
    ) -> tuple[list[tuple[Lease, RunRecord]], int]:
        """Take over leased runs whose owner stopped heart-beating.

        Runs that used up ``max_attempts`` fail with ``worker_lost``; runs with a
        pending cancel are finished as cancelled. ``exclude``: the runs the caller
        still executes. Their leases may have expired (a paused process, a slow
        heartbeat), but claiming one would start a second execution beside the first
        in the same process. Returns the claimed runs and how many expired leases
        were found.
        """
        now = time.time()
        stmt = (
            select(runs_t.c.id, runs_t.c.epoch, runs_t.c.attempt, runs_t.c.status, runs_t.c.lease_owner,
                   runs_t.c.lease_expires_at)
            .where(runs_t.c.status.in_(_LEASED_VALUES), runs_t.c.lease_expires_at < now,
                   runs_t.c.id.not_in(list(exclude)))
            .order_by(runs_t.c.priority.desc(), runs_t.c.id)
            .limit(limit)
        )
        if self.dialect == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        claimed: list[tuple[Lease, RunRecord]] = []
        events: list[EventRecord | None] = []
        expired = 0
        async with self._write() as conn:
            for run_id, epoch, attempt, status, old_owner, expired_at in (await conn.execute(stmt)).all():
                res = await conn.execute(
                    update(runs_t)
                    .where(runs_t.c.id == run_id, runs_t.c.epoch == epoch, runs_t.c.lease_expires_at < now)
                    .values(epoch=epoch + 1, lease_owner=owner, lease_expires_at=now + lease_seconds, updated_at=now)
                )
                if res.rowcount != 1:
                    continue
                expired += 1
                lease = Lease(run_id, epoch + 1, owner)
                if status == RunStatus.CANCELLING.value:
                    events.append(await self._finish(conn, lease, RunStatus.CANCELLED, now=now,
                                                     error={"code": "cancelled", "message": "Cancelled."}))
                elif attempt >= max_attempts:
                    events.append(await self._finish(conn, lease, RunStatus.FAILED, now=now, error={
                        "code": "worker_lost",
                        "message": f"The worker executing this run was lost {attempt} times (limit {max_attempts}).",
                    }))
                else:
                    row = (await conn.execute(update(runs_t).where(runs_t.c.id == run_id).values(
                        attempt=attempt + 1, status=RunStatus.RUNNING.value).returning(*runs_t.c))).one()
                    events.append(await self._append(conn, run_id, "run.recovered", {
                        "status": "running", "attempt": attempt + 1, "worker": owner,
                        "reason": "released" if old_owner is None else
                                  "worker_gone" if expired_at == 0 else "lease_expired",
                    }, epoch=lease.epoch, now=now))
                    claimed.append((lease, RunRecord.from_row(row)))
        await self._publish(events)
        return claimed, expired

    async def heartbeat(self, owner: str, leases: Sequence[Lease], lease_seconds: float) -> tuple[set[str], set[str]]:
        """Extend the leases; returns ``(lost, cancel_requested)`` run ids."""
        now = time.time()
        lost: set[str] = set()
        cancel: set[str] = set()
        if self.dialect == "postgresql":
            async with self._raw() as db:
                rows = await db.fetch(pg.HEARTBEAT, owner, now, lease_seconds,
                                      [lease.run_id for lease in leases], [lease.epoch for lease in leases])
            renewed = {r["id"]: r["cancel_requested"] for r in rows}
            return ({lease.run_id for lease in leases} - renewed.keys(),
                    {run_id for run_id, cancel in renewed.items() if cancel})
        async with self._write() as conn:
            await conn.execute(update(workers_t).where(workers_t.c.id == owner).values(heartbeat_at=now))
            for lease in leases:
                res = await conn.execute(
                    update(runs_t).where(runs_t.c.id == lease.run_id, runs_t.c.epoch == lease.epoch)
                    .values(lease_expires_at=now + lease_seconds)
                )
                if res.rowcount != 1:
                    lost.add(lease.run_id)
            ids = [lease.run_id for lease in leases if lease.run_id not in lost]
            if ids:
                rows = await conn.execute(
                    select(runs_t.c.id).where(runs_t.c.id.in_(ids), runs_t.c.cancel_requested.is_(True))
                )
                cancel = {r.id for r in rows}
        return lost, cancel

    async def write(self, lease: Lease, batch: Batch) -> list[EventRecord]:
        """Write an execution's batch in one fenced transaction, then publish its events.

        Events whose ``op_key`` is already in the log are left out (a replay, or a concurrent
        writer of the same key); the others are numbered on from ``last_seq`` without gaps. With
        an ``outcome`` its final event goes last and the run's lease is cleared. Raises
        ``LeaseLost`` (writing nothing) when another worker has claimed the run since.
        """
        now = time.time()
        events = list(batch.events)
        if batch.outcome is not None:
            out = batch.outcome
            data: dict[str, Any] = {"status": out.status.value}
            if out.error is not None:
                data["error"] = out.error
            events.append(PendingEvent(FINAL_EVENT[out.status], data, None, now))
        events = [e if e.created_at else PendingEvent(e.type, e.data, e.op_key, now) for e in events]
        if self.dialect == "postgresql":
            written = await self._write_pg(lease, batch, events, now)
        else:
            written = await self._write_generic(lease, batch, events, now)
        await self._publish(written)
        return written

    async def _write_pg(self, lease: Lease, batch: Batch, events: list[PendingEvent],
                        now: float) -> list[EventRecord]:
        out = batch.outcome
        steps = batch.steps
        async with self._raw() as db:
            row = await db.fetchrow(
                pg.WRITE, lease.run_id, lease.epoch,
                [e.type for e in events], [_json(e.data) for e in events], [e.created_at for e in events],
                [e.op_key for e in events], now,
                None if out is None else out.status.value,
                None if out is None else _json(out.output), None if out is None else _json(out.error),
                [w.step_id for w in steps], [w.name for w in steps], [w.status for w in steps],
                [_json(w.output) for w in steps], [_json(w.error) for w in steps], [w.attempt for w in steps],
                [w.started_at for w in steps], [w.finished_at for w in steps],
            )
        if row is None:
            raise LeaseLost(lease.run_id)
        first = row["last_seq"] - row["k"] + 1
        return [EventRecord(run_id=lease.run_id, seq=first + n, type=events[pos - 1].type,
                            data=events[pos - 1].data, created_at=events[pos - 1].created_at)
                for n, pos in enumerate(row["written"])]

    async def _write_generic(self, lease: Lease, batch: Batch, events: list[PendingEvent],
                             now: float) -> list[EventRecord]:
        keys = [e.op_key for e in events if e.op_key is not None]
        async with self._write() as conn:
            if keys:
                logged = set((await conn.execute(select(events_t.c.op_key).where(
                    events_t.c.run_id == lease.run_id, events_t.c.op_key.in_(keys)))).scalars())
                events = [e for e in events if e.op_key is None or e.op_key not in logged]
            values: dict[str, Any] = {"last_seq": runs_t.c.last_seq + len(events), "updated_at": now}
            if batch.outcome is not None:
                values.update(status=batch.outcome.status.value, output=batch.outcome.output,
                              error=batch.outcome.error, finished_at=now, lease_owner=None, lease_expires_at=None)
            last = (await conn.execute(
                update(runs_t).where(runs_t.c.id == lease.run_id, runs_t.c.epoch == lease.epoch)
                .values(**values).returning(runs_t.c.last_seq)
            )).scalar_one_or_none()
            if last is None:
                raise LeaseLost(lease.run_id)
            first = last - len(events) + 1
            records = [EventRecord(run_id=lease.run_id, seq=first + n, type=e.type, data=e.data,
                                   created_at=e.created_at) for n, e in enumerate(events)]
            if records:
                await conn.execute(insert(events_t), [
                    {"run_id": r.run_id, "seq": r.seq, "type": r.type, "data": r.data, "created_at": r.created_at,
                     "op_key": e.op_key} for r, e in zip(records, events, strict=True)])
            for w in batch.steps:
                stmt = sqlite_insert(steps_t).values(
                    run_id=lease.run_id, step_id=w.step_id, name=w.name, status=w.status, output=w.output,
                    error=w.error, attempt=w.attempt, started_at=w.started_at, finished_at=w.finished_at)
                await conn.execute(stmt.on_conflict_do_update(
                    index_elements=[steps_t.c.run_id, steps_t.c.step_id],
                    set_={c: stmt.excluded[c] for c in
                          ("name", "status", "output", "error", "attempt", "started_at", "finished_at")}))
        return records

    async def emit(self, lease: Lease, type_: str, data: dict[str, Any], op_key: str | None = None) -> None:
        """Write one event now (a workflow's events go through its ``Journal`` instead)."""
        try:
            await self.write(lease, Batch([PendingEvent(type_, data, op_key)], []))
        except (IntegrityError, asyncpg.UniqueViolationError):
            if op_key is None:
                raise
            return  # a concurrent emit wrote the same op_key first

    async def replay_state(self, run_id: str) -> tuple[dict[int, StepRecord], set[str]]:
        """What an earlier attempt left: its completed steps, and the op_keys of its events."""
        async with self.engine.connect() as conn:
            steps = {r.step_id: StepRecord.from_row(r) for r in await conn.execute(
                select(steps_t).where(steps_t.c.run_id == run_id, steps_t.c.status == "completed"))}
            keys = set((await conn.execute(select(events_t.c.op_key).where(
                events_t.c.run_id == run_id, events_t.c.op_key.is_not(None)))).scalars())
        return steps, keys

    async def set_waiting(self, lease: Lease, waiting: bool, data: dict[str, Any]) -> None:
        """``running <-> waiting``; a run being cancelled stays ``cancelling``."""
        src, dst = (RunStatus.RUNNING, RunStatus.WAITING) if waiting else (RunStatus.WAITING, RunStatus.RUNNING)
        async with self._write() as conn:
            res = await conn.execute(update(runs_t).where(
                runs_t.c.id == lease.run_id, runs_t.c.epoch == lease.epoch, runs_t.c.status == src.value
            ).values(status=dst.value))
            ev = None
            if res.rowcount == 1:
                ev = await self._append(conn, lease.run_id, f"run.{dst.value}", {"status": dst.value, **data},
                                        epoch=lease.epoch)
        await self._publish([ev])

    async def _finish(
        self, conn: AsyncConnection, lease: Lease, status: RunStatus, *, now: float,
        output: Any = None, error: dict[str, Any] | None = None,
    ) -> EventRecord | None:
        data: dict[str, Any] = {"status": status.value}
        if error is not None:
            data["error"] = error
        return await self._append(
            conn, lease.run_id, FINAL_EVENT[status], data, epoch=lease.epoch, now=now,
            values={"status": status.value, "output": output, "error": error, "finished_at": now,
                    "lease_owner": None, "lease_expires_at": None},
        )

    async def finish(self, lease: Lease, status: RunStatus, *, output: Any = None,
                     error: dict[str, Any] | None = None) -> None:
        await self.write(lease, Batch([], [], Outcome(status, output, error)))

    async def hold_liveness(self, owner: str) -> LivenessLock | None:
        """Take ``owner``'s liveness lock on a connection kept for it (PostgreSQL; ``None`` elsewhere).

        Taken before the worker's row is written, so no other worker can see the row without the lock.
        """
        if self.dialect != "postgresql":
            return None
        conn = await self.engine.connect()
        try:
            raw = await conn.get_raw_connection()
            driver = cast(asyncpg.Connection, raw.driver_connection)
            await driver.execute(pg.LIVENESS_LOCK, owner)
        except BaseException:
            await conn.invalidate()
            await conn.close()
            raise
        return LivenessLock(conn, driver)

    async def expire_dead_owners(self, owner: str) -> int:
        """End the leases of runs whose worker's session is gone; returns how many runs."""
        if self.dialect != "postgresql":
            return 0
        async with self._raw() as db:
            rows = await db.fetch(pg.EXPIRE_DEAD_OWNERS, owner, _LEASED_VALUES)
        return len(rows)

    async def register_worker(self, owner: str, hostname: str, pid: int, *, liveness_lock: bool = False) -> None:
        now = time.time()
        async with self._write() as conn:
            await conn.execute(insert(workers_t).values(
                id=owner, hostname=hostname, pid=pid, started_at=now, heartbeat_at=now, status="active",
                liveness_lock=liveness_lock))

    async def retire_worker(self, owner: str) -> None:
        async with self._write() as conn:
            await conn.execute(update(workers_t).where(workers_t.c.id == owner).values(
                status="stopped", heartbeat_at=time.time()))

    async def release(self, leases: Sequence[Lease]) -> None:
        """Hand runs back on a clean shutdown so another worker takes them at once."""
        async with self._write() as conn:
            for lease in leases:
                await conn.execute(update(runs_t).where(
                    runs_t.c.id == lease.run_id, runs_t.c.epoch == lease.epoch
                ).values(lease_expires_at=0.0, lease_owner=None))


def pick_fair(queued: Sequence[Any], running: Mapping[tuple[str, str], int], limits: Mapping[str, QueueLimits],
              limit: int) -> list[tuple[str, int]]:
    """What ``pg.CLAIM_LIMITED`` picks, for SQLite: ``queued`` rows ``(id, epoch, queue, tenant,
    priority)`` by priority then age; by priority, then tenants taking turns, then age, as many
    as each queue's and each tenant's free slots allow, ``limit`` at most."""
    turn: dict[tuple[str, str], int] = {}
    ranked = []
    for run_id, epoch, queue, tenant, priority in queued:
        turn[(queue, tenant)] = tn = turn.get((queue, tenant), 0) + 1
        tconc = limits[queue].tenant_concurrency
        if tconc is None or running.get((queue, tenant), 0) + tn <= tconc:
            ranked.append((-priority, tn, run_id, epoch, queue))
    ranked.sort()
    in_queue: dict[str, int] = {}
    for (queue, _tenant), n in running.items():
        in_queue[queue] = in_queue.get(queue, 0) + n
    picked: list[tuple[str, int]] = []
    for _prio, _tn, run_id, epoch, queue in ranked:
        conc = limits[queue].concurrency
        if conc is not None and in_queue.get(queue, 0) >= conc:
            continue
        in_queue[queue] = in_queue.get(queue, 0) + 1
        picked.append((run_id, epoch))
        if len(picked) >= limit:
            break
    return picked


def _queued_record(new: NewRun, run_id: str, now: float) -> RunRecord:
    """The run as ``pg.CREATE_MANY`` inserts it."""
    return RunRecord(
        id=run_id, tenant=new.tenant, workflow=new.workflow, status=RunStatus.QUEUED, input=new.input,
        metadata=new.metadata, priority=new.priority, output=None, error=None,
        idempotency_key=new.idempotency_key, request_hash=new.request_hash,
        timeout_seconds=new.timeout_seconds, deadline_at=None, created_at=now, updated_at=now,
        started_at=None, finished_at=None, attempt=0, epoch=0, lease_owner=None, lease_expires_at=None,
        cancel_requested=False, last_seq=1, queue=new.queue)


def _json(value: Any) -> str | None:
    """JSON text for a ``json`` parameter of a raw statement; ``None`` stays SQL NULL."""
    return None if value is None else json.dumps(value, separators=(",", ":"))

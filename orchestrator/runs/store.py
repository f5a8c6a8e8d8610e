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
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from orchestrator.db.models import Run, RunEvent, RunStep, Worker
from orchestrator.errors import Conflict, NotFound, RateLimited
from orchestrator.events.bus import EventBus
from orchestrator.ids import new_id
from orchestrator.runs.records import EventRecord, RunRecord, StepRecord
from orchestrator.runs.states import ACTIVE, FINAL_EVENT, LEASED, RunStatus

# Core tables, not ORM classes: the store writes with statements (fenced UPDATEs, RETURNING).
# ``__table__`` is typed as any FromClause; for a declarative class it is always a Table.
runs_t = cast(Table, Run.__table__)
events_t = cast(Table, RunEvent.__table__)
steps_t = cast(Table, RunStep.__table__)
workers_t = cast(Table, Worker.__table__)

CONTROL_CHANNEL = "control"


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


class RunStore:
    """Run persistence plus bus notifications after each commit."""

    def __init__(self, engine: AsyncEngine, bus: EventBus) -> None:
        self.engine = engine
        self.bus = bus
        self.dialect = engine.dialect.name
        # SQLite allows one writer at a time and makes the others retry with sleeps (seconds
        # at the tail under load), and it has no SKIP LOCKED for claims. One process owns a
        # SQLite file, so queueing its write transactions on a lock is both faster and fair.
        self._write_lock = asyncio.Lock() if self.dialect == "sqlite" else contextlib.nullcontext()

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
        op_key: str | None = None,
        now: float | None = None,
        values: dict[str, Any] | None = None,
    ) -> EventRecord | None:
        """Append one event (and apply ``values`` to the run row) in the caller's transaction.

        With ``epoch`` the write is fenced. With ``op_key`` an event already written
        by an earlier attempt is not written again (returns ``None``).
        """
        now = time.time() if now is None else now
        if op_key is not None:
            exists = await conn.scalar(
                select(events_t.c.seq).where(events_t.c.run_id == run_id, events_t.c.op_key == op_key)
            )
            if exists is not None:
                return None
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
            insert(events_t).values(run_id=run_id, seq=seq, type=type_, data=data, created_at=now, op_key=op_key)
        )
        return EventRecord(run_id=run_id, seq=seq, type=type_, data=data, created_at=now)

    async def _publish(self, events: Sequence[EventRecord | None]) -> None:
        for ev in events:
            if ev is not None:
                await self.bus.publish(run_channel(ev.run_id), ev.message())

    # ---- API side ------------------------------------------------------------------

    async def create(self, new: NewRun, *, max_active: int | None) -> tuple[RunRecord, bool]:
        """Insert a queued run. Returns ``(run, created)``; ``created`` is False for an idempotent replay.

        A created run is returned as it was committed, ``queued``: it is read back inside the
        inserting transaction, and the wake-up for the workers is published only after that.
        A response built from a read after the commit could already say ``running`` (or even
        ``succeeded``), since any worker may claim the run as soon as it is committed. A replay
        returns the original run as it is now.
        """
        now = time.time()
        run_id = new_id("run")
        try:
            async with self._write() as conn:
                if self.dialect == "postgresql":
                    await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:t))"), {"t": new.tenant})
                await conn.execute(
                    insert(runs_t).values(
                        id=run_id, tenant=new.tenant, workflow=new.workflow, status=RunStatus.QUEUED.value,
                        input=new.input, metadata=new.metadata, priority=new.priority,
                        idempotency_key=new.idempotency_key, request_hash=new.request_hash,
                        timeout_seconds=new.timeout_seconds, created_at=now, updated_at=now,
                        attempt=0, epoch=0, cancel_requested=False, last_seq=0,
                    )
                )
                if max_active is not None:
                    active = (await conn.execute(
                        select(func.count()).select_from(runs_t).where(
                            runs_t.c.tenant == new.tenant, runs_t.c.status.in_([s.value for s in ACTIVE])
                        )
                    )).scalar_one()
                    if active > max_active:
                        raise RateLimited(
                            f"Tenant has {active - 1} active runs; the limit is {max_active}.",
                            retry_after=1.0, code="too_many_concurrent_runs",
                        )
                ev = await self._append(conn, run_id, "run.queued", {"status": "queued", "workflow": new.workflow},
                                        now=now)
                # read back in the same transaction: once it commits a worker may claim the run
                # at once (its poll, or the wake-up below), and the 201 must say what was created
                run = RunRecord.from_row((await conn.execute(select(runs_t).where(runs_t.c.id == run_id))).one())
        except IntegrityError:
            if new.idempotency_key is None:
                raise
            existing = await self._by_idempotency_key(new.tenant, new.idempotency_key)
            if existing is None:  # pragma: no cover - deleted between the two statements
                raise
            if existing.request_hash != new.request_hash:
                raise Conflict(
                    "This Idempotency-Key was already used with a different request body.",
                    code="idempotency_key_reused", param="Idempotency-Key",
                ) from None
            return existing, False
        await self._publish([ev])
        await self.bus.publish(CONTROL_CHANNEL, {"type": "queued", "run_id": run_id})
        return run, True

    async def _by_idempotency_key(self, tenant: str, key: str) -> RunRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(
                select(runs_t).where(runs_t.c.tenant == tenant, runs_t.c.idempotency_key == key)
            )).first()
        return RunRecord.from_row(row) if row else None

    async def get(self, tenant: str | None, run_id: str) -> RunRecord:
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
        """Claim up to ``limit`` queued runs, highest priority then oldest first."""
        now = time.time()
        stmt = (
            select(runs_t.c.id, runs_t.c.epoch)
            .where(runs_t.c.status == RunStatus.QUEUED.value)
            .order_by(runs_t.c.priority.desc(), runs_t.c.id)
            .limit(limit)
        )
        if self.dialect == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        claimed: list[tuple[Lease, RunRecord]] = []
        events: list[EventRecord | None] = []
        async with self._write() as conn:
            for run_id, epoch in (await conn.execute(stmt)).all():
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
            select(runs_t.c.id, runs_t.c.epoch, runs_t.c.attempt, runs_t.c.status, runs_t.c.lease_owner)
            .where(runs_t.c.status.in_([s.value for s in LEASED]), runs_t.c.lease_expires_at < now,
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
            for run_id, epoch, attempt, status, old_owner in (await conn.execute(stmt)).all():
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
                        "reason": "released" if old_owner is None else "lease_expired",
                    }, epoch=lease.epoch, now=now))
                    claimed.append((lease, RunRecord.from_row(row)))
        await self._publish(events)
        return claimed, expired

    async def heartbeat(self, owner: str, leases: Sequence[Lease], lease_seconds: float) -> tuple[set[str], set[str]]:
        """Extend the leases; returns ``(lost, cancel_requested)`` run ids."""
        now = time.time()
        lost: set[str] = set()
        cancel: set[str] = set()
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

    async def emit(self, lease: Lease, type_: str, data: dict[str, Any], op_key: str | None = None) -> None:
        try:
            async with self._write() as conn:
                ev = await self._append(conn, lease.run_id, type_, data, epoch=lease.epoch, op_key=op_key)
        except IntegrityError:
            if op_key is None:
                raise
            return  # a concurrent emit wrote the same op_key first
        await self._publish([ev])

    async def completed_steps(self, run_id: str) -> dict[int, StepRecord]:
        stmt = select(steps_t).where(steps_t.c.run_id == run_id, steps_t.c.status == "completed")
        async with self.engine.connect() as conn:
            return {r.step_id: StepRecord.from_row(r) for r in await conn.execute(stmt)}

    async def start_step(self, lease: Lease, step_id: int, name: str, attempt: int) -> None:
        now = time.time()
        async with self._write() as conn:
            ev = await self._append(conn, lease.run_id, "step.started",
                                    {"step_id": step_id, "name": name, "attempt": attempt},
                                    epoch=lease.epoch, now=now)
            existing = await conn.scalar(select(steps_t.c.step_id).where(
                steps_t.c.run_id == lease.run_id, steps_t.c.step_id == step_id))
            if existing is None:
                await conn.execute(insert(steps_t).values(
                    run_id=lease.run_id, step_id=step_id, name=name, status="running",
                    attempt=attempt, started_at=now))
            else:
                await conn.execute(update(steps_t).where(
                    steps_t.c.run_id == lease.run_id, steps_t.c.step_id == step_id
                ).values(name=name, status="running", attempt=attempt, started_at=now, error=None, finished_at=None))
        await self._publish([ev])

    async def end_step(
        self, lease: Lease, step_id: int, name: str, *, output: Any = None, error: dict[str, Any] | None = None,
        summary: dict[str, Any] | None = None,
    ) -> None:
        """Checkpoint a step's result and its event in one fenced transaction."""
        now = time.time()
        status = "failed" if error else "completed"
        data: dict[str, Any] = {"step_id": step_id, "name": name}
        if error:
            data["error"] = error
        if summary:
            data.update(summary)
        async with self._write() as conn:
            ev = await self._append(conn, lease.run_id, f"step.{status}", data, epoch=lease.epoch, now=now)
            await conn.execute(update(steps_t).where(
                steps_t.c.run_id == lease.run_id, steps_t.c.step_id == step_id
            ).values(status=status, output=output, error=error, finished_at=now))
        await self._publish([ev])

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
        async with self._write() as conn:
            ev = await self._finish(conn, lease, status, now=time.time(), output=output, error=error)
        await self._publish([ev])

    async def register_worker(self, owner: str, hostname: str, pid: int) -> None:
        now = time.time()
        async with self._write() as conn:
            await conn.execute(insert(workers_t).values(
                id=owner, hostname=hostname, pid=pid, started_at=now, heartbeat_at=now, status="active"))

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

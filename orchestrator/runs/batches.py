"""Batches of runs (``POST /v1/batches``): many runs submitted, read and cancelled as one.

A batch's runs are ordinary runs: durable, scheduled, executed, resumed and cancelled by the
same machinery as a run submitted alone. What the batch adds is kept beside them, not in the
runs' hot paths: a ``batches`` row and a ``batch_runs`` link (position -> run). A batch's status
and counts are read from its runs, so they can never disagree with them.

A batch is written in one transaction: the batch row, every run with its first event
(``run.queued``) and the links, after the tenant's active runs were counted under the
tenant's lock (the same lock single submissions take). A batch the quota refuses, or a
duplicate ``Idempotency-Key`` found by the batch row's unique constraint, writes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Table, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from orchestrator.db.models import Batch, BatchRun
from orchestrator.errors import Conflict, NotFound, RateLimited
from orchestrator.ids import new_id
from orchestrator.runs.records import EventRecord, RunRecord, StepRecord
from orchestrator.runs.states import ACTIVE, RunStatus
from orchestrator.runs.store import CONTROL_CHANNEL, RunStore, events_t, run_channel, runs_t, steps_t

batches_t = cast(Table, Batch.__table__)
batch_runs_t = cast(Table, BatchRun.__table__)
TERMINAL = [s.value for s in RunStatus if s.terminal]
_ACTIVE_VALUES = [s.value for s in ACTIVE]
# The key of a run's metadata that says which batch (and position) it belongs to, and whether
# the ``agent`` workflow records its tokens; a batch's own metadata may not use it.
RUN_METADATA_KEY = "batch"


@dataclass(frozen=True, slots=True)
class BatchRecord:
    id: str
    tenant: str
    workflow: str
    metadata: dict[str, Any]
    return_tokens: bool
    total: int
    idempotency_key: str | None
    request_hash: str | None
    created_at: float
    cancel_requested: bool

    @classmethod
    def from_mapping(cls, m: Any) -> BatchRecord:
        return cls(id=m["id"], tenant=m["tenant"], workflow=m["workflow"], metadata=m["metadata"] or {},
                   return_tokens=bool(m["return_tokens"]), total=m["total"], idempotency_key=m["idempotency_key"],
                   request_hash=m["request_hash"], created_at=m["created_at"],
                   cancel_requested=bool(m["cancel_requested"]))


@dataclass
class NewBatch:
    tenant: str
    workflow: str
    inputs: list[Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    return_tokens: bool = False
    priority: int = 0
    timeout_seconds: float | None = None
    queue: str = "default"
    idempotency_key: str | None = None
    request_hash: str | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    """A run of a batch that has finished: what the batch's event stream sends."""

    index: int
    run_id: str
    status: str
    finished_at: float


def batch_status(batch: BatchRecord, counts: dict[str, int]) -> str:
    """``in_progress`` while a run is active, then ``completed``; after a cancel of the whole
    batch, ``cancelling`` until its runs have stopped, then ``cancelled``."""
    active = sum(n for status, n in counts.items() if status in _ACTIVE_VALUES)
    if batch.cancel_requested:
        return "cancelling" if active else "cancelled"
    return "in_progress" if active else "completed"


class BatchStore:
    """Reads and writes of batches, over the run store's engine, bus and write lock."""

    def __init__(self, runs: RunStore) -> None:
        self.runs = runs
        self.engine = runs.engine

    async def create(self, new: NewBatch, *, max_active: int | None) -> tuple[BatchRecord, bool]:
        """Write the batch and all its runs, or nothing. ``(batch, created)``; ``created`` is
        False for a replayed ``Idempotency-Key`` (``409`` when the key came with another body)."""
        now = time.time()
        batch_id = new_id("batch")
        n = len(new.inputs)
        run_ids = [new_id("run") for _ in range(n)]
        try:
            async with self.runs._write() as conn:
                # the key first: a replay is found before any quota is counted
                await conn.execute(insert(batches_t).values(
                    id=batch_id, tenant=new.tenant, workflow=new.workflow, metadata=new.metadata,
                    return_tokens=new.return_tokens, total=n, idempotency_key=new.idempotency_key,
                    request_hash=new.request_hash, created_at=now, cancel_requested=False))
                if max_active is not None:
                    await self.runs._lock_tenant(conn, new.tenant)
                    active = (await conn.execute(select(func.count()).select_from(runs_t).where(
                        runs_t.c.tenant == new.tenant, runs_t.c.status.in_(_ACTIVE_VALUES)))).scalar_one()
                    if active + n > max_active:
                        raise RateLimited(
                            f"Tenant has {active} active runs; this batch adds {n} and the limit is {max_active}.",
                            retry_after=5.0, code="too_many_concurrent_runs")
                await conn.execute(insert(runs_t), [{
                    "id": run_id, "tenant": new.tenant, "workflow": new.workflow, "status": RunStatus.QUEUED.value,
                    "input": inp, "metadata": {**new.metadata, RUN_METADATA_KEY: {
                        "id": batch_id, "index": i, "return_tokens": new.return_tokens}},
                    "priority": new.priority, "idempotency_key": None, "request_hash": None,
                    "timeout_seconds": new.timeout_seconds, "created_at": now, "updated_at": now, "attempt": 0,
                    "epoch": 0, "cancel_requested": False, "last_seq": 1, "queue": new.queue,
                } for i, (run_id, inp) in enumerate(zip(run_ids, new.inputs, strict=True))])
                await conn.execute(insert(events_t), [{
                    "run_id": run_id, "seq": 1, "type": "run.queued", "created_at": now,
                    "data": {"status": "queued", "workflow": new.workflow, "batch_id": batch_id, "index": i},
                } for i, run_id in enumerate(run_ids)])
                await conn.execute(insert(batch_runs_t), [
                    {"batch_id": batch_id, "idx": i, "run_id": run_id} for i, run_id in enumerate(run_ids)])
        except IntegrityError:
            if new.idempotency_key is None:
                raise
            existing = await self._by_key(new.tenant, new.idempotency_key)
            if existing is None:  # pragma: no cover - deleted between the two statements
                raise Conflict("This Idempotency-Key's batch was deleted meanwhile; retry.",
                               code="idempotency_key_reused", param="Idempotency-Key") from None
            if existing.request_hash != new.request_hash:
                raise Conflict("This Idempotency-Key was already used with a different request body.",
                               code="idempotency_key_reused", param="Idempotency-Key") from None
            return existing, False
        # one wake-up: a worker claims every queued run it has room for
        await self.runs.bus.publish(CONTROL_CHANNEL, {"type": "queued", "run_id": run_ids[0], "count": n})
        return BatchRecord(id=batch_id, tenant=new.tenant, workflow=new.workflow, metadata=new.metadata,
                           return_tokens=new.return_tokens, total=n, idempotency_key=new.idempotency_key,
                           request_hash=new.request_hash, created_at=now, cancel_requested=False), True

    async def _by_key(self, tenant: str, key: str) -> BatchRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(batches_t).where(
                batches_t.c.tenant == tenant, batches_t.c.idempotency_key == key))).first()
        return BatchRecord.from_mapping(row._mapping) if row else None

    async def get(self, tenant: str, batch_id: str) -> BatchRecord:
        """The tenant's batch; another tenant's is ``404`` exactly like an unknown id."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(batches_t).where(
                batches_t.c.id == batch_id, batches_t.c.tenant == tenant))).first()
        if row is None:
            raise NotFound(f"No batch with id {batch_id!r}.", code="batch_not_found", param="batch_id")
        return BatchRecord.from_mapping(row._mapping)

    async def page(self, tenant: str, *, limit: int, after: str | None) -> list[BatchRecord]:
        """The tenant's batches, newest first; ``after``: the last id of the previous page."""
        cond = [batches_t.c.tenant == tenant]
        if after is not None:
            cond.append(batches_t.c.id < after)
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(batches_t).where(*cond).order_by(batches_t.c.id.desc()).limit(limit))
            return [BatchRecord.from_mapping(r._mapping) for r in rows]

    async def counts(self, batch_id: str) -> dict[str, int]:
        """How many of the batch's runs are in each status (statuses with none left out)."""
        stmt = (select(runs_t.c.status, func.count()).select_from(
            batch_runs_t.join(runs_t, runs_t.c.id == batch_runs_t.c.run_id))
            .where(batch_runs_t.c.batch_id == batch_id).group_by(runs_t.c.status))
        async with self.engine.connect() as conn:
            return {str(status): int(n) for status, n in (await conn.execute(stmt)).all()}

    async def members(self, batch_id: str, *, after: int, limit: int) -> list[tuple[int, RunRecord]]:
        """The batch's runs at positions after ``after``, in input order, ``limit`` at most."""
        stmt = (select(batch_runs_t.c.idx, runs_t).select_from(
            batch_runs_t.join(runs_t, runs_t.c.id == batch_runs_t.c.run_id))
            .where(batch_runs_t.c.batch_id == batch_id, batch_runs_t.c.idx > after)
            .order_by(batch_runs_t.c.idx).limit(limit))
        async with self.engine.connect() as conn:
            return [(row.idx, RunRecord.from_row(row)) for row in await conn.execute(stmt)]

    async def turn_steps(self, run_ids: Sequence[str]) -> dict[str, list[StepRecord]]:
        """The completed ``turn-*`` checkpoints (the agent's LLM calls) of these runs, in order."""
        out: dict[str, list[StepRecord]] = {run_id: [] for run_id in run_ids}
        if not run_ids:
            return out
        stmt = (select(steps_t).where(steps_t.c.run_id.in_(list(run_ids)), steps_t.c.name.like("turn-%"),
                                      steps_t.c.status == "completed")
                .order_by(steps_t.c.run_id, steps_t.c.step_id))
        async with self.engine.connect() as conn:
            for row in await conn.execute(stmt):
                out[row.run_id].append(StepRecord.from_row(row))
        return out

    async def finished_since(self, batch_id: str, since: float) -> list[Completion]:
        """The batch's finished runs with ``finished_at >= since``, oldest first."""
        stmt = (select(batch_runs_t.c.idx, runs_t.c.id, runs_t.c.status, runs_t.c.finished_at).select_from(
            batch_runs_t.join(runs_t, runs_t.c.id == batch_runs_t.c.run_id))
            .where(batch_runs_t.c.batch_id == batch_id, runs_t.c.status.in_(TERMINAL),
                   runs_t.c.finished_at >= since)
            .order_by(runs_t.c.finished_at, batch_runs_t.c.idx))
        async with self.engine.connect() as conn:
            return [Completion(idx, run_id, status, finished_at or 0.0)
                    for idx, run_id, status, finished_at in (await conn.execute(stmt)).all()]

    async def cancel(self, tenant: str, batch_id: str) -> BatchRecord:
        """Cancel every run of the batch that has not finished (idempotent): queued ones at once,
        running or waiting ones through ``cancelling`` (their workers stop them, on any replica),
        each with the event a cancel of that run alone writes. Finished runs stay as they are."""
        await self.get(tenant, batch_id)
        now = time.time()
        members = select(batch_runs_t.c.run_id).where(batch_runs_t.c.batch_id == batch_id)
        events: list[EventRecord] = []
        stopping: list[tuple[str, str | None]] = []
        async with self.runs._write() as conn:
            await conn.execute(update(batches_t).where(batches_t.c.id == batch_id).values(cancel_requested=True))
            cancelled = (await conn.execute(
                update(runs_t).where(runs_t.c.id.in_(members), runs_t.c.status == RunStatus.QUEUED.value)
                .values(status=RunStatus.CANCELLED.value, cancel_requested=True, finished_at=now, updated_at=now,
                        error={"code": "cancelled", "message": "Cancelled before it started."},
                        last_seq=runs_t.c.last_seq + 1)
                .returning(runs_t.c.id, runs_t.c.last_seq))).all()
            events += [EventRecord(run_id, seq, "run.cancelled", {"status": "cancelled"}, now)
                       for run_id, seq in cancelled]
            leased = (await conn.execute(
                update(runs_t).where(runs_t.c.id.in_(members),
                                     runs_t.c.status.in_([RunStatus.RUNNING.value, RunStatus.WAITING.value]))
                .values(status=RunStatus.CANCELLING.value, cancel_requested=True, updated_at=now,
                        last_seq=runs_t.c.last_seq + 1)
                .returning(runs_t.c.id, runs_t.c.last_seq, runs_t.c.lease_owner))).all()
            events += [EventRecord(run_id, seq, "run.cancelling", {"status": "cancelling"}, now)
                       for run_id, seq, _owner in leased]
            stopping = [(run_id, owner) for run_id, _seq, owner in leased]
            if events:
                await conn.execute(insert(events_t), [
                    {"run_id": e.run_id, "seq": e.seq, "type": e.type, "data": e.data, "created_at": e.created_at}
                    for e in events])
        await self.runs.bus.publish_many(
            [(run_channel(e.run_id), e.message()) for e in events]
            + [(CONTROL_CHANNEL, {"type": "cancel", "run_id": run_id, "owner": owner}) for run_id, owner in stopping])
        return await self.get(tenant, batch_id)


def return_tokens_asked(metadata: dict[str, Any]) -> bool:
    """Whether a run's metadata asks its workflow to record token ids and logprobs (a run of a
    batch submitted with ``return_tokens``)."""
    batch = metadata.get(RUN_METADATA_KEY)
    return isinstance(batch, dict) and batch.get("return_tokens") is True


def trajectory(turns: Sequence[Any]) -> tuple[dict[str, Any] | None, str | None]:
    """One training sequence from the ``tokens`` records of an agent's turn checkpoints, in order.

    The first turn gives its whole prompt, then each turn its completion; a later turn's prompt
    normally starts with everything before it (the conversation so far, as the engine saw it),
    so only its new tokens are added: tool results, the next user message and the chat
    template's tokens, all with mask 0 and logprob ``None``. Completion tokens have mask 1 and
    their logprob, except tokens a grammar forced (mask 0; they were not sampled). Where a
    later prompt does not start with the sequence (the template rendered an earlier turn in
    other tokens than the model wrote), its whole prompt is appended and the turn is listed
    in ``retokenized_turns``: the sequence is then not one context. Returns ``(None, reason)``
    when a turn has no token ids (the backend returned none).
    """
    ids: list[int] = []
    logprobs: list[float | None] = []
    mask: list[int] = []
    retokenized: list[int] = []
    if not turns:
        return None, "no completed LLM turns"
    for n, rec in enumerate(turns):
        tok = rec.get("tokens") if isinstance(rec, dict) else None
        if tok is None:
            return None, f"turn {n} recorded no tokens"
        prompt, completion = tok.get("prompt_ids"), tok.get("completion_ids")
        if prompt is None or (not completion and rec.get("usage", {}).get("completion_tokens")):
            return None, f"the backend of turn {n} returned no token ids"
        if prompt[: len(ids)] == ids:
            new = prompt[len(ids):]
        else:
            new = prompt
            retokenized.append(n)
        ids += new
        logprobs += [None] * len(new)
        mask += [0] * len(new)
        ids += completion
        logprobs += tok["completion_logprobs"]
        mask += tok["completion_mask"]
    return {"token_ids": ids, "logprobs": logprobs, "loss_mask": mask, "retokenized_turns": retokenized}, None

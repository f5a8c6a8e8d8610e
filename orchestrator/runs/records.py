"""What the run store returns: immutable, typed rows of runs, steps and events.

The store used to hand out ``dict(row._mapping)``: a misspelt key was a ``KeyError`` at run
time, a status a bare string, and nothing told a caller which keys a row has. These records
are built from a row in one place each, so a column added to a table and forgotten here is
an error in the store's own tests, not in a caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from sqlalchemy import Row

from orchestrator.runs.states import RunStatus

StepStatus = Literal["running", "completed", "failed"]


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One row of ``runs``: a workflow execution, its lease and its outcome."""

    id: str
    tenant: str
    workflow: str
    status: RunStatus
    input: Any
    metadata: dict[str, Any]
    priority: int
    output: Any
    error: dict[str, Any] | None
    idempotency_key: str | None
    request_hash: str | None
    timeout_seconds: float | None
    deadline_at: float | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    attempt: int
    epoch: int
    lease_owner: str | None
    lease_expires_at: float | None
    cancel_requested: bool
    last_seq: int
    forked_from: str | None = None
    forked_from_step: int | None = None
    queue: str = "default"

    @classmethod
    def from_row(cls, row: Row[Any]) -> RunRecord:
        return cls.from_mapping(row._mapping)

    @classmethod
    def from_mapping(cls, m: Mapping[Any, Any]) -> RunRecord:
        """From anything keyed by column name: a SQLAlchemy row's mapping, an asyncpg record."""
        return cls(
            id=m["id"], tenant=m["tenant"], workflow=m["workflow"], status=RunStatus(m["status"]),
            input=m["input"], metadata=m["metadata"] or {}, priority=m["priority"], output=m["output"],
            error=m["error"], idempotency_key=m["idempotency_key"], request_hash=m["request_hash"],
            timeout_seconds=m["timeout_seconds"], deadline_at=m["deadline_at"], created_at=m["created_at"],
            updated_at=m["updated_at"], started_at=m["started_at"], finished_at=m["finished_at"],
            attempt=m["attempt"], epoch=m["epoch"], lease_owner=m["lease_owner"],
            lease_expires_at=m["lease_expires_at"], cancel_requested=bool(m["cancel_requested"]),
            last_seq=m["last_seq"], forked_from=m["forked_from"], forked_from_step=m["forked_from_step"],
            queue=m["queue"],
        )


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One checkpointed step of a run; ``output`` is what a replay returns once it completed."""

    run_id: str
    step_id: int
    name: str
    status: StepStatus
    output: Any
    error: dict[str, Any] | None
    attempt: int
    started_at: float
    finished_at: float | None

    @classmethod
    def from_row(cls, row: Row[Any]) -> StepRecord:
        m = row._mapping
        return cls(
            run_id=m["run_id"], step_id=m["step_id"], name=m["name"], status=cast(StepStatus, m["status"]),
            output=m["output"], error=m["error"], attempt=m["attempt"], started_at=m["started_at"],
            finished_at=m["finished_at"],
        )


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One entry of a run's event log, numbered gap-free per run from 1."""

    run_id: str
    seq: int
    type: str
    data: dict[str, Any]
    created_at: float

    def message(self) -> dict[str, Any]:
        """The event as the bus carries it (JSON over Redis): the same keys as the record."""
        return {"run_id": self.run_id, "seq": self.seq, "type": self.type, "data": self.data,
                "created_at": self.created_at}

    @classmethod
    def from_message(cls, msg: dict[str, Any]) -> EventRecord:
        return cls(run_id=msg["run_id"], seq=msg["seq"], type=msg["type"], data=msg["data"],
                   created_at=msg["created_at"])

"""Tables of the control plane.

Times are stored as UNIX seconds (double precision): they compare the same way on
SQLite and PostgreSQL and need no timezone handling.
"""

from __future__ import annotations

from typing import Any, ClassVar

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


# ``Integer`` columns are 32-bit on PostgreSQL (64-bit on SQLite): a value compared with one (an
# event sequence number from a client, say) must lie within this bound, which holds on both.
INT32_MAX = 2**31 - 1


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, Any: JSON}


class Run(Base):
    """One execution of a workflow. ``epoch`` fences every write made after a claim."""

    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    workflow: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))
    input: Mapped[Any] = mapped_column(JSON)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    output: Mapped[Any | None] = mapped_column(JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    timeout_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    deadline_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    # A fork starts from the original's checkpoints of the steps before ``forked_from_step``.
    forked_from: Mapped[str | None] = mapped_column(String(40), nullable=True)
    forked_from_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    queue: Mapped[str] = mapped_column(String(64), default="default", server_default="default")

    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_runs_tenant_idempotency_key"),
        Index("ix_runs_tenant_id", "tenant", "id"),
        Index("ix_runs_status_priority", "status", "priority", "created_at"),
        Index("ix_runs_lease", "status", "lease_expires_at"),
        Index("ix_runs_queue_status", "queue", "status", "tenant"),
        # The claim's order over the queued runs only: a claim reads the runs it takes, not
        # every queued run to sort them (migration 0006)
        Index("ix_runs_queued", text("priority DESC"), "id", postgresql_where=text("status = 'queued'"),
              sqlite_where=text("status = 'queued'")),
        # A tenant's active runs, counted at each submission under a limit: by the active runs'
        # entries, not every run the tenant ever had (migration 0006)
        Index("ix_runs_tenant_status", "tenant", "status"),
    )


class RunEvent(Base):
    """Append-only event log. ``op_key`` makes events emitted by a replayed workflow idempotent."""

    __tablename__ = "run_events"

    run_id: Mapped[str] = mapped_column(String(40), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    type: Mapped[str] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    op_key: Mapped[str | None] = mapped_column(String(128), nullable=True)

    __table_args__ = (UniqueConstraint("run_id", "op_key", name="uq_run_events_op_key"),)


class RunStep(Base):
    """A checkpointed step: once ``completed``, replay returns ``output`` instead of running it."""

    __tablename__ = "run_steps"

    run_id: Mapped[str] = mapped_column(String(40), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    step_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))
    output: Mapped[Any | None] = mapped_column(JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Worker(Base):
    """A service process that executes runs; its heartbeat shows it is alive."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16))
    # Holds ``pg_advisory_lock(LIVENESS_LOCK_SPACE, hashtext(id))`` while it lives (PostgreSQL):
    # once the lock is free its session is gone, and its runs are recovered without waiting
    # for their leases to expire.
    liveness_lock: Mapped[bool] = mapped_column(Boolean, default=False)


class Batch(Base):
    """A batch of runs submitted together (``POST /v1/batches``): RL rollouts, evaluations.

    Its status and counts are not stored: they are read from its runs, which stay the unit
    that is scheduled, executed, resumed and cancelled. ``cancel_requested`` remembers that the
    batch as a whole was cancelled (its status then reads ``cancelling`` / ``cancelled``).
    """

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    workflow: Mapped[str] = mapped_column(String(128))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    return_tokens: Mapped[bool] = mapped_column(Boolean, default=False)
    total: Mapped[int] = mapped_column(Integer)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_batches_tenant_idempotency_key"),
        Index("ix_batches_tenant_id", "tenant", "id"),
    )


class BatchRun(Base):
    """A run of a batch, at its line's position (``idx``, from 0) in the submission."""

    __tablename__ = "batch_runs"

    batch_id: Mapped[str] = mapped_column(String(40), ForeignKey("batches.id", ondelete="CASCADE"),
                                          primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(String(40), ForeignKey("runs.id", ondelete="CASCADE"), unique=True)

"""Typed objects returned by the SDK (mirrors of the service's response bodies)."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "timed_out"})
FINAL_EVENT_TYPES = frozenset(f"run.{s}" for s in TERMINAL_STATUSES)


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class Run(_Model):
    id: str
    workflow: str
    status: str
    input: Any = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    priority: int = 0
    output: Any = None
    error: dict[str, Any] | None = None
    attempt: int = 0
    timeout_seconds: float | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    last_event_seq: int = 0
    forked_from: str | None = None
    forked_from_step: int | None = None
    queue: str = "default"

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES


class RunEvent(_Model):
    run_id: str
    seq: int
    type: str
    data: dict[str, Any] = Field(default_factory=dict)
    created_at: float

    @property
    def final(self) -> bool:
        return self.type in FINAL_EVENT_TYPES


class Step(_Model):
    step_id: int
    name: str
    status: str
    output: Any = None
    error: dict[str, Any] | None = None
    attempt: int
    started_at: float
    finished_at: float | None = None


class Workflow(_Model):
    name: str
    description: str = ""
    input_schema: dict[str, Any] = Field(default_factory=dict)


class Page(_Model, Generic[T]):
    data: list[T]
    has_more: bool = False
    next_cursor: str | None = None


BATCH_FINAL_STATUSES = frozenset({"completed", "cancelled"})


class BatchCounts(_Model):
    total: int
    queued: int = 0
    running: int = 0
    waiting: int = 0
    cancelling: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    timed_out: int = 0


class Batch(_Model):
    """A batch of runs: ``status`` is ``in_progress``, ``completed``, ``cancelling`` or ``cancelled``."""

    id: str
    workflow: str
    status: str
    return_tokens: bool = False
    metadata: dict[str, Any] = Field(default_factory=dict)
    counts: BatchCounts
    created_at: float

    @property
    def finished(self) -> bool:
        return self.status in BATCH_FINAL_STATUSES


class BatchResult(_Model):
    """One trajectory of a batch, at its input position. With ``return_tokens``: ``token_ids``,
    ``logprobs`` (``None`` for tokens the model did not sample) and ``loss_mask`` (1 for sampled
    tokens), all the same length, or ``tokens_error`` saying why there are none."""

    index: int
    run_id: str
    status: str
    output: Any = None
    error: dict[str, Any] | None = None
    token_ids: list[int] | None = None
    logprobs: list[float | None] | None = None
    loss_mask: list[int] | None = None
    retokenized_turns: list[int] | None = None
    tokens_error: str | None = None


class BatchEvent(_Model):
    """``batch.run_finished`` (``index``, ``run_id``, ``status``, ``finished_at``) or, last,
    ``batch.finished`` (``status``, ``counts``)."""

    type: str
    batch_id: str
    index: int | None = None
    run_id: str | None = None
    status: str | None = None
    finished_at: float | None = None
    counts: dict[str, int] | None = None

    @property
    def final(self) -> bool:
        return self.type == "batch.finished"

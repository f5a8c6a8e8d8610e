"""Request and response bodies of the public API (they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.runs.states import RunStatus
from orchestrator.settings import QUEUE_NAME_PATTERN

T = TypeVar("T")


class RunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # see orchestrator.api.strict_json

    workflow: str = Field(min_length=1, max_length=128, description="Registered workflow name, e.g. `demo`.")
    input: Any = Field(default=None, description="Workflow input; validated against the workflow's input schema.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form labels kept with the run.")
    priority: int = Field(default=0, ge=-1000, le=1000, description="Higher runs are claimed first.")
    timeout_seconds: float | None = Field(default=None, gt=0, le=7 * 86_400,
                                          description="Wall-clock limit from first start; then `timed_out`.")
    queue: str = Field(default="default", max_length=64, pattern=QUEUE_NAME_PATTERN, description=(
        "The named queue the run waits in: `default`, or one of the service's `ORCH_QUEUES`, whose "
        "limits say how many of its runs (and of one tenant's) execute at once."))


class RunFork(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    from_step: int = Field(ge=0, le=1_000_000, description=(
        "The first step the new run executes; the steps before it are copied from the original's "
        "completed checkpoints (0: run everything again, with the same input)."))


class RunError(BaseModel):
    code: str
    message: str
    model_config = ConfigDict(extra="allow")


class RunObject(BaseModel):
    object: Literal["run"] = "run"
    id: str
    workflow: str
    status: RunStatus
    input: Any = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    priority: int = 0
    output: Any = None
    error: RunError | None = None
    attempt: int = 0
    timeout_seconds: float | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    last_event_seq: int = 0
    forked_from: str | None = Field(default=None, description="The run this one was forked from.")
    forked_from_step: int | None = Field(default=None, description="Steps before this one came from `forked_from`.")
    queue: str = "default"


class Page(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    next_cursor: str | None = Field(default=None, description="Pass as `after` (runs) or `starting_after` (events).")


class RunEventObject(BaseModel):
    object: Literal["run.event"] = "run.event"
    run_id: str
    seq: int = Field(description="Per-run sequence number, gap-free from 1; the SSE event id.")
    type: str
    data: dict[str, Any]
    created_at: float


class StepObject(BaseModel):
    object: Literal["run.step"] = "run.step"
    step_id: int
    name: str
    status: Literal["running", "completed", "failed"]
    output: Any = None
    error: dict[str, Any] | None = None
    attempt: int
    started_at: float
    finished_at: float | None = None


class WorkflowObject(BaseModel):
    object: Literal["workflow"] = "workflow"
    name: str
    description: str
    input_schema: dict[str, Any]


class ErrorDetail(BaseModel):
    type: str
    code: str
    message: str
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": desc}
    for code, desc in {
        400: "Malformed request", 401: "Missing or invalid API key", 404: "Unknown id",
        409: "Conflict", 413: "Body too large", 422: "Validation failed", 429: "Quota exceeded",
    }.items()
}

"""``/v1/runs``: submit, read, list, cancel, steps and the event stream of runs."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import pydantic_core
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from orchestrator.api.schemas import (
    ERROR_RESPONSES,
    Page,
    RunCreate,
    RunError,
    RunFork,
    RunEventObject,
    RunObject,
    StepObject,
    WorkflowObject,
)
from orchestrator.api.fast import FastRoute
from orchestrator.api.strict_json import NotJSON, StrictJSONRoute, decode
from orchestrator.auth import Tenant, authenticate
from orchestrator.db.models import INT32_MAX
from orchestrator.errors import Conflict, InvalidRequest, NotFound, RateLimited, ValidationFailed
from orchestrator.ids import id_pattern, is_valid_id
from orchestrator.metrics import Metrics
from orchestrator.runs.records import EventRecord, RunRecord, StepRecord
from orchestrator.runs.states import FINAL_EVENT, RunStatus
from orchestrator.runs.store import NewRun, RunStore, request_hash, run_channel

router = APIRouter(prefix="/v1", tags=["runs"], responses=ERROR_RESPONSES, route_class=StrictJSONRoute)
FINAL_TYPES = frozenset(FINAL_EVENT.values())
REPLAY_BATCH = 500

TenantDep = Annotated[Tenant, Depends(authenticate)]
# Documented, not enforced by FastAPI: an id of another shape is simply unknown (404 run_not_found)
RUN_ID_PATTERN = {"pattern": id_pattern("run")}
RunId = Annotated[str, Path(json_schema_extra=RUN_ID_PATTERN)]
# One server-sent event of a run's stream, as OpenAPI 3.1 describes a text/event-stream item
SSE_EVENT = {"type": "object", "required": ["id", "event", "data"], "properties": {
    "id": {"type": "string", "pattern": "^[0-9]+$"}, "event": {"type": "string"},
    "data": {"type": "string", "contentMediaType": "application/json",
             "contentSchema": {"$ref": "#/components/schemas/RunEventObject"}}}}
# OpenAPI links from a created run to what can be done with it (stateful clients and fuzzers)
RUN_LINKS = {name: {"operationId": op, "parameters": {"run_id": "$response.body#/id"}} for name, op in [
    ("GetRun", "get_run_v1_runs__run_id__get"), ("CancelRun", "cancel_run_v1_runs__run_id__cancel_post"),
    ("ListSteps", "list_steps_v1_runs__run_id__steps_get"), ("RunEvents", "run_events_v1_runs__run_id__events_get")]}


def _store(request: Request) -> RunStore:
    store: RunStore = request.app.state.store
    return store


def _check_id(run_id: str) -> None:
    if not is_valid_id("run", run_id):
        raise NotFound(f"No run with id {run_id!r}.", code="run_not_found", param="run_id")


@router.post("/runs", status_code=201, response_model=RunObject, summary="Submit a run",
             responses={201: {"description": "The run, queued (or the original one, for a replayed "
                                             "`Idempotency-Key`)", "links": RUN_LINKS}})
async def create_run(
    body: RunCreate,
    request: Request,
    tenant: TenantDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> Response:
    """Queue a workflow run. With ``Idempotency-Key``, a retry with the same body returns the
    original run (header ``Idempotent-Replayed: true``); a different body answers ``409``."""
    return _created(*await _submit(request.app.state, tenant, body, idempotency_key))


async def create_run_fast(scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /v1/runs`` as a plain ASGI route (``orchestrator.api.fast``): what ``create_run``
    does, in the order FastAPI does it (the strict body decoding, the key and its rate limit, the
    header, the body), without the router's matching and dependency solving, a fifth of a
    submission's CPU. ``create_run`` documents it; ``tests/test_bad_input.py`` and the schema
    fuzzing hold the two to the same answers."""
    request = Request(scope, receive)
    raw = await request.body()
    value: Any = None
    if raw:
        try:
            value = decode(raw)
        except NotJSON as exc:
            raise InvalidRequest(f"Request body is not valid JSON: {exc}.", code="invalid_json") from None
        if not _json_content_type(request.headers.get("content-type")):
            value = raw  # FastAPI validates a body of another type as it is: not an object
    tenant = await authenticate(request)
    key = request.headers.get("idempotency-key")
    if key is not None and len(key) > 255:
        raise ValidationFailed("String should have at most 255 characters at idempotency-key",
                               param="idempotency-key")
    try:
        body = RunCreate.model_validate(value)
    except ValidationError as exc:
        raise ValidationFailed.first_of(exc.errors()) from None
    response = _created(*await _submit(request.app.state, tenant, body, key))
    await response(scope, receive, send)


def _json_content_type(value: str | None) -> bool:
    """Whether FastAPI would read the body as JSON: no content type, or ``application/*json``."""
    if not value:
        return True
    kind = value.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


CREATE_RUN_ROUTE = FastRoute("/v1/runs", "POST", create_run_fast, None)


async def _submit(state: Any, tenant: Tenant, body: RunCreate,
                  idempotency_key: str | None) -> tuple[RunRecord, bool]:
    defn = state.registry.get(body.workflow)
    if defn is None:
        raise ValidationFailed(
            f"Unknown workflow {body.workflow!r}; known: {', '.join(state.registry.names())}.",
            code="unknown_workflow", param="workflow",
        )
    try:
        # strict, as JSON: an enum or a tuple field takes its JSON form (see orchestrator.api.strict_json)
        parsed = defn.input_model.model_validate_json(pydantic_core.to_json(body.input), strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in ("input", *first["loc"]))
        raise ValidationFailed(f"Invalid input for workflow {body.workflow!r}: {first['msg']} at {loc}.",
                               code="invalid_input", param=loc) from None
    defn.check_input(parsed, tenant.limits)
    if body.queue != "default" and body.queue not in state.settings.queues:
        raise ValidationFailed(
            f"Unknown queue {body.queue!r}; known: {', '.join(['default', *state.settings.queues])}.",
            code="unknown_queue", param="queue")
    payload = body.model_dump(mode="json")
    if body.queue == "default":
        del payload["queue"]  # the hash of a request from before queues existed stays the same
    new = NewRun(
        tenant=tenant.name, workflow=body.workflow, input=body.input, metadata=body.metadata,
        priority=body.priority, timeout_seconds=body.timeout_seconds, idempotency_key=idempotency_key,
        request_hash=request_hash(payload), queue=body.queue,
    )
    return await _create(state, tenant, new)


async def _create(state: Any, tenant: Tenant, new: NewRun) -> tuple[RunRecord, bool]:
    """Insert the run (a submission or a fork) under the tenant's concurrent-runs quota, counted."""
    with _quota_refusals(state):
        run, created = await state.store.create(new, max_active=tenant.limits.max_concurrent_runs)
    if created:
        state.metrics.runs_submitted.labels(new.workflow).inc()
    return run, created


@contextlib.contextmanager
def _quota_refusals(state: Any) -> Iterator[None]:
    """Count a refusal by the tenant's concurrent-runs quota (submit, fork, resume)."""
    try:
        yield
    except RateLimited:
        state.metrics.rate_limited.labels("concurrent_runs").inc()
        raise


def _created(run: RunRecord, created: bool) -> Response:
    headers = {"Location": f"/v1/runs/{run.id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return _json(_run_object(run), 201, headers)


@router.get("/runs", response_model=Page[RunObject], summary="List runs, newest first")
async def list_runs(
    request: Request,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="`next_cursor` of the previous page",
                                       json_schema_extra=RUN_ID_PATTERN)] = None,
    status: Annotated[list[RunStatus] | None, Query(description="Filter by status (repeat or comma-separate)")] = None,
    workflow: Annotated[str | None, Query(max_length=128)] = None,
) -> Page[RunObject]:
    if after is not None and not is_valid_id("run", after):
        raise InvalidRequest(f"Invalid cursor {after!r}.", code="invalid_cursor", param="after")
    runs, more = await _store(request).list_runs(tenant.name, limit=limit, after=after, status=status,
                                                 workflow=workflow)
    return Page[RunObject](data=[_run_object(r) for r in runs], has_more=more,
                           next_cursor=runs[-1].id if more else None)


@router.get("/runs/{run_id}", response_model=RunObject, summary="Get a run")
async def get_run(
    run_id: RunId,
    request: Request,
    tenant: TenantDep,
    wait: Annotated[float, Query(ge=0, description="Long-poll up to this many seconds for the run to finish")] = 0,
) -> Response:
    _check_id(run_id)
    store = _store(request)
    run = await store.get(tenant.name, run_id)
    wait = min(wait, request.app.state.settings.max_wait_seconds)
    if wait > 0 and not run.status.terminal:
        deadline = time.monotonic() + wait
        async with store.bus.subscribe(run_channel(run_id)) as sub:
            run = await store.get(tenant.name, run_id)
            while not run.status.terminal:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                msg = await sub.get(timeout=min(left, 1.0))
                if msg is None or msg.get("type") in FINAL_TYPES or sub.lagged:
                    run = await store.get(tenant.name, run_id)
    return _json(_run_object(run))


@router.post("/runs/{run_id}/cancel", response_model=RunObject, summary="Cancel a run (idempotent)")
async def cancel_run(run_id: RunId, request: Request, tenant: TenantDep) -> RunObject:
    _check_id(run_id)
    return _run_object(await _store(request).request_cancel(tenant.name, run_id))


@router.post("/runs/{run_id}/resume", response_model=RunObject,
             summary="Resume a failed, cancelled or timed-out run from its checkpoints")
async def resume_run(run_id: RunId, request: Request, tenant: TenantDep) -> RunObject:
    """Queue the run again under the same id: its completed steps are replayed from their
    checkpoints, the others run. Its timeout starts over. ``409 run_not_resumable`` for a run
    that succeeded or is still active."""
    _check_id(run_id)
    with _quota_refusals(request.app.state):
        run = await _store(request).resume(tenant.name, run_id, max_active=tenant.limits.max_concurrent_runs)
    return _run_object(run)


@router.post("/runs/{run_id}/fork", status_code=201, response_model=RunObject,
             summary="Start a new run from another run's checkpoints",
             responses={201: {"description": "The new run, queued", "links": RUN_LINKS}})
async def fork_run(
    run_id: RunId,
    body: RunFork,
    request: Request,
    tenant: TenantDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> Response:
    """A new run of the same workflow, input and metadata whose steps before ``from_step`` return
    the original's checkpointed outputs, and which executes from ``from_step`` on: replay an agent
    from a given turn, branch a trajectory, or retry after a fix. The original is not touched.
    ``409 step_not_completed`` when a step before ``from_step`` has no completed checkpoint."""
    _check_id(run_id)
    store = _store(request)
    original = await store.get(tenant.name, run_id)
    if request.app.state.registry.get(original.workflow) is None:
        raise Conflict(f"Workflow {original.workflow!r} of this run is not in this service.",
                       code="unknown_workflow", param="run_id")
    new = NewRun(
        tenant=tenant.name, workflow=original.workflow, input=original.input, metadata=original.metadata,
        priority=original.priority, timeout_seconds=original.timeout_seconds, idempotency_key=idempotency_key,
        request_hash=request_hash({"fork": run_id, **body.model_dump(mode="json")}),
        forked_from=run_id, forked_from_step=body.from_step, queue=original.queue,
    )
    return _created(*await _create(request.app.state, tenant, new))


@router.get("/runs/{run_id}/steps", response_model=Page[StepObject], summary="Checkpointed steps of a run")
async def list_steps(run_id: RunId, request: Request, tenant: TenantDep) -> Page[StepObject]:
    _check_id(run_id)
    store = _store(request)
    await store.get(tenant.name, run_id)
    steps = await store.steps(run_id)
    return Page[StepObject](data=[_step_object(s) for s in steps], has_more=False)


def _json(model: RunObject, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """The model as the response, serialised by pydantic in one call: returning a ``Response``
    skips FastAPI's validation and ``jsonable_encoder`` pass over a model built right here (a
    tenth of a submission's time, on the two routes every client polls). The route's
    ``response_model`` still documents it."""
    return Response(model.model_dump_json(), status_code=status, media_type="application/json", headers=headers)


def _run_object(run: RunRecord) -> RunObject:
    return RunObject(
        id=run.id, workflow=run.workflow, status=run.status, input=run.input, metadata=run.metadata,
        priority=run.priority, output=run.output,
        error=None if run.error is None else RunError.model_validate(run.error), attempt=run.attempt,
        timeout_seconds=run.timeout_seconds, created_at=run.created_at,
        started_at=run.started_at, finished_at=run.finished_at, last_event_seq=run.last_seq,
        forked_from=run.forked_from, forked_from_step=run.forked_from_step, queue=run.queue,
    )


def _step_object(step: StepRecord) -> StepObject:
    return StepObject(step_id=step.step_id, name=step.name, status=step.status, output=step.output,
                      error=step.error, attempt=step.attempt, started_at=step.started_at,
                      finished_at=step.finished_at)


@router.get(
    "/runs/{run_id}/events",
    response_model=Page[RunEventObject],
    summary="Events of a run: SSE stream, or a JSON page",
    responses={200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
                     "description": "JSON page, or SSE with `Accept: text/event-stream`"}},
)
async def run_events(
    run_id: RunId,
    request: Request,
    tenant: TenantDep,
    starting_after: Annotated[int, Query(ge=0, le=INT32_MAX,
                                         description="Return events with a larger sequence number")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    last_event_id: Annotated[int | None, Header(ge=0, le=INT32_MAX,
                                                description="SSE resume point (sequence number); wins")] = None,
) -> Any:
    """With ``Accept: text/event-stream``: replay from the durable log after ``starting_after``
    (or ``Last-Event-ID``), then tail live; keep-alive comments; closes after the final event, at
    once when it resumes at or past it. Otherwise: a page of events as JSON."""
    _check_id(run_id)
    store = _store(request)
    await store.get(tenant.name, run_id)
    if last_event_id is not None:
        starting_after = last_event_id
    if "text/event-stream" in request.headers.get("accept", ""):
        state = request.app.state
        if starting_after > 0:
            state.metrics.sse_resumes.inc()
        return StreamingResponse(
            _sse(store, run_id, starting_after, state.settings.sse_keepalive_seconds, state.metrics),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    events = await store.events(run_id, after=starting_after, limit=limit + 1)
    more = len(events) > limit
    events = events[:limit]
    return Page[RunEventObject](data=[_event_object(e) for e in events], has_more=more,
                                next_cursor=str(events[-1].seq) if more else None)


def _event_object(ev: EventRecord) -> RunEventObject:
    return RunEventObject(run_id=ev.run_id, seq=ev.seq, type=ev.type, data=ev.data, created_at=ev.created_at)


def _frame(ev: EventRecord) -> str:
    body = _event_object(ev).model_dump_json()
    return f"id: {ev.seq}\nevent: {ev.type}\ndata: {body}\n\n"


async def _sse(store: RunStore, run_id: str, after: int, keepalive: float, metrics: Metrics) -> AsyncIterator[str]:
    """Subscribe first, then read the log, then tail: no event can fall between the two. The log
    is read again whenever the live messages may have missed something. A run found finished
    before a log read has all its events there: once they are sent the stream ends, also when
    the resume point is at or past the final event, where nothing would ever follow."""
    metrics.sse_streams.inc()
    last = after
    try:
        async with store.bus.subscribe(run_channel(run_id)) as sub:
            yield "retry: 1000\n\n"
            while True:
                finished = (await store.get(None, run_id)).status.terminal
                while True:  # the log after `last`, page by page
                    batch = await store.events(run_id, after=last, limit=REPLAY_BATCH)
                    for ev in batch:
                        yield _frame(ev)
                        last = ev.seq
                        if ev.type in FINAL_TYPES:
                            return
                    if len(batch) < REPLAY_BATCH:
                        break
                if finished:
                    return
                while True:  # live, until the log must be read again
                    msg = await sub.get(timeout=keepalive)
                    if msg is None:
                        yield ": keep-alive\n\n"
                        break
                    new = _live([msg, *sub.drain()], last, sub.lagged)
                    if new is None:
                        sub.lagged = False
                        break
                    for ev in new:
                        yield _frame(ev)
                        last = ev.seq
                        if ev.type in FINAL_TYPES:
                            return
    finally:
        metrics.sse_streams.dec()


def _live(msgs: list[dict[str, Any]], last: int, lagged: bool) -> list[EventRecord] | None:
    """The live events to send after ``last``, in order; ``None`` when the log must be read
    instead: the bus dropped messages or skipped a number, or a final event at or before
    ``last`` came (a stream resumed past the run's end while it was finishing)."""
    events = [EventRecord.from_message(m) for m in msgs]
    new = sorted((e for e in events if e.seq > last), key=lambda e: e.seq)
    if lagged or any(e.seq != last + 1 + i for i, e in enumerate(new)):
        return None
    if any(e.type in FINAL_TYPES for e in events if e.seq <= last):
        return None
    return new


@router.get("/workflows", response_model=Page[WorkflowObject], tags=["workflows"],
            summary="Workflows this service runs")
async def list_workflows(request: Request, tenant: TenantDep) -> Page[WorkflowObject]:
    reg = request.app.state.registry
    data = [WorkflowObject(name=d.name, description=d.description, input_schema=d.input_model.model_json_schema())
            for d in reg]
    return Page[WorkflowObject](data=data, has_more=False)


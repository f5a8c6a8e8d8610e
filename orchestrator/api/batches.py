"""``/v1/batches``: many runs of one workflow submitted, followed, read and cancelled as one.

Built for RL rollouts: thousands of ``agent`` trajectories under the one scheduler, whose
results come back in input order with, when asked, each trajectory's token ids, logprobs and
loss mask for training. Every line of a batch is an ordinary run (see
``orchestrator.runs.batches``), so everything that holds for runs (durability, recovery,
queues, resume, per-run events) holds for a batch's runs.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import pydantic_core
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.api.schemas import ERROR_RESPONSES, Page, RunError
from orchestrator.api.strict_json import NotJSON, StrictJSONRoute, decode
from orchestrator.auth import Tenant, authenticate
from orchestrator.errors import APIError, InvalidRequest, NotFound, PayloadTooLarge, RateLimited, ValidationFailed
from orchestrator.ids import id_pattern, is_valid_id
from orchestrator.runs.batches import (
    RUN_METADATA_KEY, BatchRecord, BatchStore, Completion, NewBatch, batch_status, trajectory,
)
from orchestrator.runs.records import RunRecord
from orchestrator.runs.states import RunStatus
from orchestrator.runs.store import request_hash
from orchestrator.settings import QUEUE_NAME_PATTERN

router = APIRouter(prefix="/v1", tags=["batches"], responses=ERROR_RESPONSES, route_class=StrictJSONRoute)
TenantDep = Annotated[Tenant, Depends(authenticate)]
BATCH_ID_PATTERN = {"pattern": id_pattern("batch")}
BatchId = Annotated[str, Path(json_schema_extra=BATCH_ID_PATTERN)]
JSONL_TYPES = frozenset({"application/jsonl", "application/x-ndjson", "application/x-jsonlines"})
RESULTS_PAGE = 200  # runs read (with their turn checkpoints) per query while streaming results
POLL_S = 0.5  # how often the event stream looks for newly finished runs
# A run's outcome is committed a little after its ``finished_at`` was taken; a stream resumed
# from a completion at time t sends again what finished from t - GRACE_S on (at least once).
GRACE_S = 5.0
# An event id: finished_at in ms, then the run's index; as a resume point also a bare time in ms
# (``0``: from the start)
CURSOR_PATTERN = r"^[0-9]{1,15}(-[0-9]{1,9})?$"
# One server-sent event of a batch's stream, as OpenAPI 3.1 describes a text/event-stream item
SSE_EVENT = {"type": "object", "required": ["event", "data"], "properties": {
    "id": {"type": "string", "pattern": CURSOR_PATTERN},
    "event": {"type": "string", "enum": ["batch.run_finished", "batch.finished"]},
    "data": {"type": "string", "contentMediaType": "application/json"}}}


class BatchCreate(BaseModel):
    """The JSON form of a batch; a JSONL body holds the ``requests`` one a line instead, the
    other fields then go in the query."""

    model_config = ConfigDict(extra="forbid", strict=True)

    workflow: str = Field(default="agent", min_length=1, max_length=128, description="Registered workflow name.")
    requests: list[Any] = Field(min_length=1, description=(
        "One workflow input per run, in the order results come back."))
    metadata: dict[str, Any] = Field(default_factory=dict, description=(
        f"Kept with the batch and copied into each run's metadata, with `{RUN_METADATA_KEY}` "
        "(`{id, index, return_tokens}`) added."))
    return_tokens: bool = Field(default=False, description=(
        "`agent` runs record each turn's token ids and logprobs; results then carry `token_ids`, "
        "`logprobs` and `loss_mask` per trajectory."))
    priority: int = Field(default=0, ge=-1000, le=1000)
    timeout_seconds: float | None = Field(default=None, gt=0, le=7 * 86_400)
    queue: str = Field(default="default", max_length=64, pattern=QUEUE_NAME_PATTERN)


class BatchCounts(BaseModel):
    total: int
    queued: int = 0
    running: int = 0
    waiting: int = 0
    cancelling: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    timed_out: int = 0


class BatchObject(BaseModel):
    object: str = "batch"
    id: str
    workflow: str
    status: str = Field(description="`in_progress`, `completed`, `cancelling` or `cancelled`.")
    return_tokens: bool
    metadata: dict[str, Any]
    counts: BatchCounts
    created_at: float


class BatchResult(BaseModel):
    """One line of ``/results``: a trajectory, at its input position."""

    object: str = "batch.result"
    index: int
    run_id: str
    status: RunStatus
    output: Any = None
    error: RunError | None = None
    token_ids: list[int] | None = None
    logprobs: list[float | None] | None = None
    loss_mask: list[int] | None = None
    retokenized_turns: list[int] | None = None
    tokens_error: str | None = None


def _component_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema referring to the document's components (``RunStatus``, ``RunError``:
    the run routes put them there)."""
    js = model.model_json_schema(ref_template="#/components/schemas/{model}")
    js.pop("$defs", None)
    return js


# OpenAPI links from a created batch to what can be done with it (stateful clients and fuzzers).
# Not to its event stream: that stays open until every run has finished.
BATCH_LINKS = {name: {"operationId": op, "parameters": {"batch_id": "$response.body#/id"}} for name, op in [
    ("GetBatch", "get_batch_v1_batches__batch_id__get"),
    ("CancelBatch", "cancel_batch_v1_batches__batch_id__cancel_post"),
    ("BatchResults", "batch_results_v1_batches__batch_id__results_get")]}


def _check_id(batch_id: str) -> None:
    if not is_valid_id("batch", batch_id):
        raise NotFound(f"No batch with id {batch_id!r}.", code="batch_not_found", param="batch_id")


def _batches(request: Request) -> BatchStore:
    store: BatchStore = request.app.state.batches
    return store


async def _object(store: BatchStore, batch: BatchRecord) -> BatchObject:
    counts = await store.counts(batch.id)
    return BatchObject(id=batch.id, workflow=batch.workflow, status=batch_status(batch, counts),
                       return_tokens=batch.return_tokens, metadata=batch.metadata,
                       counts=BatchCounts(total=batch.total, **counts), created_at=batch.created_at)


# The JSON form; ``install_openapi`` makes it one variant per workflow. The JSONL form (a body of
# ``application/jsonl``, options in the query) is described in words: a JSON Schema cannot say
# what a valid text of lines is, nor that the query options go only with it.
_BODY_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/BatchCreate"}}}}}
JSONL_OPTIONS = ("workflow", "return_tokens", "priority", "timeout_seconds", "queue")


def install_openapi(app: Any) -> None:
    """Complete ``app.openapi`` (after ``openapi.install``): ``BatchCreate`` as one variant per
    workflow whose ``requests`` are that workflow's inputs (``x-workflow-inputs``), as
    ``RunCreate`` is, and the queue names the service knows."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        schema: dict[str, Any] = base()
        components = schema["components"]["schemas"]
        if "BatchCreate" not in components:
            js = BatchCreate.model_json_schema(ref_template="#/components/schemas/{model}")
            props = js["properties"]
            props["queue"]["enum"] = ["default", *app.state.settings.queues]
            variants = []
            for workflow, name in schema.get("x-workflow-inputs", {}).items():
                required = ["requests"] if workflow == "agent" else ["workflow", "requests"]
                variants.append({
                    "type": "object", "title": f"BatchCreate ({workflow})", "additionalProperties": False,
                    "required": required, "properties": {
                        **props, "workflow": {"const": workflow, "description": props["workflow"]["description"]},
                        "metadata": {**props["metadata"], "not": {"required": [RUN_METADATA_KEY]}},
                        "requests": {**props["requests"], "items": {"$ref": f"#/components/schemas/{name}"}}}})
            components["BatchCreate"] = {"title": "BatchCreate", "description": BatchCreate.__doc__,
                                         "oneOf": variants}
        return schema

    app.openapi = openapi


@router.post("/batches", status_code=201, response_model=BatchObject, summary="Submit a batch of runs",
             openapi_extra=_BODY_DOC,
             responses={201: {"description": "The batch (or the original one, for a replayed `Idempotency-Key`)",
                              "links": BATCH_LINKS}})
async def create_batch(
    request: Request,
    tenant: TenantDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> Response:
    """Every request becomes a run, or none does: a bad one refuses the whole batch (its position
    in the message and ``param``), and a refused batch writes nothing. ``Idempotency-Key`` as for
    ``POST /v1/runs``.

    Also as JSONL: ``Content-Type: application/jsonl`` (or ``application/x-ndjson``), one
    workflow input a line (blank lines skipped), and the options in the query: ``workflow``
    (default ``agent``), ``return_tokens``, ``priority``, ``timeout_seconds``, ``queue``. A bad
    line is named by its number (``param`` ``line N...``)."""
    state = request.app.state
    settings = state.settings
    body = await request.body()
    kind = (request.headers.get("content-type") or "application/json").split(";", 1)[0].strip().lower()
    options = {k: request.query_params[k] for k in JSONL_OPTIONS if k in request.query_params}
    if kind in JSONL_TYPES:
        lines = _jsonl(body, settings.max_batch_line_bytes)
        try:  # lax: the query's strings as the fields' types ("true", "5")
            spec = BatchCreate.model_validate({"requests": [None], **options}, strict=False)
        except ValidationError as exc:
            raise ValidationFailed.first_of(exc.errors()) from None
        spec.requests = [value for _, value in lines]
        where = [f"line {n}" for n, _ in lines]
    elif kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json")):
        given = list(options)
        if given:
            raise ValidationFailed(f"Query option {given[0]!r} is for a JSONL body; a JSON body carries it as a "
                                   "field.", param=given[0])
        try:
            raw = decode(body)
        except NotJSON as exc:
            raise InvalidRequest(f"Request body is not valid JSON: {exc}.", code="invalid_json") from None
        try:
            spec = BatchCreate.model_validate_json(pydantic_core.to_json(raw), strict=True)
        except ValidationError as exc:
            raise ValidationFailed.first_of(exc.errors()) from None
        for i, value in enumerate(spec.requests):
            if len(pydantic_core.to_json(value)) > settings.max_batch_line_bytes:
                raise PayloadTooLarge(f"requests[{i}] is over the limit of {settings.max_batch_line_bytes} bytes "
                                      "a request (ORCH_MAX_BATCH_LINE_BYTES).", param=f"requests[{i}]")
        where = [f"requests[{i}]" for i in range(len(spec.requests))]
    else:
        err = APIError(f"Content type {kind!r} is not accepted: send application/json or application/jsonl.",
                       code="unsupported_media_type")
        err.type, err.status_code = "invalid_request_error", 415
        raise err
    new = _validate(state, tenant, spec, where, idempotency_key)
    try:
        batch, created = await _batches(request).create(new, max_active=tenant.limits.max_concurrent_runs)
    except RateLimited:
        state.metrics.rate_limited.labels("concurrent_runs").inc()
        raise
    if created:
        state.metrics.runs_submitted.labels(spec.workflow).inc(len(spec.requests))
    headers = {"Location": f"/v1/batches/{batch.id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    obj = await _object(_batches(request), batch)
    return Response(obj.model_dump_json(), status_code=201, media_type="application/json", headers=headers)


def _jsonl(body: bytes, max_line: int) -> list[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line; the first bad line refuses the body."""
    out = []
    for n, line in enumerate(body.split(b"\n"), 1):
        if not line.strip():
            continue
        if len(line) > max_line:
            raise PayloadTooLarge(f"Line {n} has {len(line)} bytes; the limit is {max_line} a line "
                                  "(ORCH_MAX_BATCH_LINE_BYTES).", param=f"line {n}")
        try:
            out.append((n, decode(line)))
        except NotJSON as exc:
            raise InvalidRequest(f"Line {n} is not valid JSON: {exc}.", code="invalid_json",
                                 param=f"line {n}") from None
        except ValidationFailed as exc:
            raise ValidationFailed(f"Line {n}: {exc.message}", code=exc.code,
                                   param=f"line {n}" + (f".{exc.param}" if exc.param else "")) from None
    return out


def _validate(state: Any, tenant: Tenant, spec: BatchCreate, where: list[str],
              idempotency_key: str | None) -> NewBatch:
    """Every input checked as ``POST /v1/runs`` checks one, before anything is written."""
    settings = state.settings
    n = len(spec.requests)
    if n == 0:
        raise ValidationFailed("A batch needs at least one request.", param="requests")
    if n > settings.max_batch_requests:
        raise ValidationFailed(f"A batch holds at most {settings.max_batch_requests} requests "
                               f"(ORCH_MAX_BATCH_REQUESTS); this one has {n}.", code="batch_too_large",
                               param="requests")
    limit = tenant.limits.max_concurrent_runs
    if limit is not None and n > limit:
        raise ValidationFailed(f"This batch has {n} runs and this tenant may have at most {limit} active: split "
                               "it, or raise the tenant's max_concurrent_runs.", code="batch_too_large",
                               param="requests")
    if RUN_METADATA_KEY in spec.metadata:
        raise ValidationFailed(f"metadata.{RUN_METADATA_KEY} is set by the service on a batch's runs.",
                               param=f"metadata.{RUN_METADATA_KEY}")
    defn = state.registry.get(spec.workflow)
    if defn is None:
        raise ValidationFailed(f"Unknown workflow {spec.workflow!r}; known: {', '.join(state.registry.names())}.",
                               code="unknown_workflow", param="workflow")
    if spec.queue != "default" and spec.queue not in settings.queues:
        raise ValidationFailed(f"Unknown queue {spec.queue!r}; known: {', '.join(['default', *settings.queues])}.",
                               code="unknown_queue", param="queue")
    for at, value in zip(where, spec.requests, strict=True):
        try:
            parsed = defn.input_model.model_validate_json(pydantic_core.to_json(value), strict=True)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise ValidationFailed(f"{at.capitalize()}: invalid input for workflow {spec.workflow!r}: {first['msg']}"
                                   + (f" at {loc}" if loc else "") + ".", code="invalid_input",
                                   param=at + (f".{loc}" if loc else "")) from None
        try:
            defn.check_input(parsed, tenant.limits)
        except APIError as exc:
            exc.message = f"{at.capitalize()}: {exc.message}"
            exc.args = (exc.message,)
            exc.param = at + (f".{exc.param}" if exc.param else "")
            raise
    payload = spec.model_dump(mode="json")
    return NewBatch(tenant=tenant.name, workflow=spec.workflow, inputs=spec.requests, metadata=spec.metadata,
                    return_tokens=spec.return_tokens, priority=spec.priority, timeout_seconds=spec.timeout_seconds,
                    queue=spec.queue, idempotency_key=idempotency_key, request_hash=request_hash(payload))


@router.get("/batches", response_model=Page[BatchObject], summary="List batches, newest first")
async def list_batches(
    request: Request,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="`next_cursor` of the previous page",
                                       json_schema_extra=BATCH_ID_PATTERN)] = None,
) -> Page[BatchObject]:
    if after is not None and not is_valid_id("batch", after):
        raise InvalidRequest(f"Invalid cursor {after!r}.", code="invalid_cursor", param="after")
    store = _batches(request)
    batches = await store.page(tenant.name, limit=limit + 1, after=after)
    more = len(batches) > limit
    batches = batches[:limit]
    return Page[BatchObject](data=[await _object(store, b) for b in batches], has_more=more,
                             next_cursor=batches[-1].id if more else None)


@router.get("/batches/{batch_id}", response_model=BatchObject, summary="Get a batch: status and counts")
async def get_batch(batch_id: BatchId, request: Request, tenant: TenantDep) -> BatchObject:
    _check_id(batch_id)
    store = _batches(request)
    return await _object(store, await store.get(tenant.name, batch_id))


@router.post("/batches/{batch_id}/cancel", response_model=BatchObject, summary="Cancel a batch (idempotent)")
async def cancel_batch(batch_id: BatchId, request: Request, tenant: TenantDep) -> BatchObject:
    """Queued runs are cancelled at once, running or waiting ones stop through ``cancelling``;
    finished runs keep their outcome."""
    _check_id(batch_id)
    store = _batches(request)
    return await _object(store, await store.cancel(tenant.name, batch_id))


@router.get("/batches/{batch_id}/results", summary="Results of a batch: JSONL, one line a run, in input order",
            response_class=StreamingResponse,
            responses={200: {"description": "One `BatchResult` a line",
                             "content": {"application/jsonl": {"schema": _component_schema(BatchResult)}}}})
async def batch_results(batch_id: BatchId, request: Request, tenant: TenantDep) -> StreamingResponse:
    """Every run of the batch, finished or not (``status`` says), at its input position. With
    ``return_tokens``: the trajectory's ``token_ids``, ``logprobs`` and ``loss_mask`` (see
    ``orchestrator.runs.batches.trajectory``), or ``tokens_error`` saying why there are none."""
    _check_id(batch_id)
    store = _batches(request)
    batch = await store.get(tenant.name, batch_id)
    return StreamingResponse(_results(store, batch), media_type="application/jsonl")


async def _results(store: BatchStore, batch: BatchRecord) -> AsyncIterator[bytes]:
    after = -1
    while True:
        members = await store.members(batch.id, after=after, limit=RESULTS_PAGE)
        if not members:
            return
        steps = await store.turn_steps([run.id for _, run in members]) if batch.return_tokens else {}
        lines = []
        for index, run in members:
            lines.append(_result(index, run, [s.output for s in steps.get(run.id, [])], batch.return_tokens)
                         .model_dump_json(exclude_none=not batch.return_tokens) + "\n")
        yield "".join(lines).encode()
        after = members[-1][0]


def _result(index: int, run: RunRecord, turns: list[Any], return_tokens: bool) -> BatchResult:
    result = BatchResult(index=index, run_id=run.id, status=run.status, output=run.output,
                         error=None if run.error is None else RunError.model_validate(run.error))
    if not return_tokens:
        return result
    if not run.status.terminal:
        result.tokens_error = f"the run is {run.status.value}"
        return result
    tokens, why = trajectory(turns)
    if tokens is None:
        result.tokens_error = why
    else:
        result.token_ids, result.logprobs = tokens["token_ids"], tokens["logprobs"]
        result.loss_mask, result.retokenized_turns = tokens["loss_mask"], tokens["retokenized_turns"]
    return result


# The JSON form of the events (without ``Accept: text/event-stream``): what the stream would
# send now, as one list
EVENTS_PAGE = {"type": "object", "required": ["object", "data", "finished"], "properties": {
    "object": {"type": "string", "enum": ["list"]},
    "data": {"type": "array", "items": {"type": "object", "required": ["object", "type", "batch_id"], "properties": {
        "object": {"type": "string", "enum": ["batch.event"]},
        "type": {"type": "string", "enum": ["batch.run_finished", "batch.finished"]},
        "batch_id": {"type": "string"}}}},
    "finished": {"type": "boolean"}}}


@router.get("/batches/{batch_id}/events", summary="Completions of a batch's runs (JSON, or SSE)",
            response_class=StreamingResponse,
            responses={200: {"description": "`batch.run_finished` per finished run, then `batch.finished`: "
                                            "SSE with `Accept: text/event-stream`, else the events so far as JSON",
                             "content": {"text/event-stream": {"schema": SSE_EVENT},
                                         "application/json": {"schema": EVENTS_PAGE}}}})
async def batch_events(
    batch_id: BatchId,
    request: Request,
    tenant: TenantDep,
    last_event_id: Annotated[str | None, Header(pattern=CURSOR_PATTERN,
                                                description="SSE resume point: an event id of this stream")] = None,
) -> Response:
    """With ``Accept: text/event-stream``: a ``batch.run_finished`` event as each run finishes
    (``{index, run_id, status}``), then ``batch.finished`` with the counts, and the stream
    closes. Resumed with ``Last-Event-ID`` (an event id, or a time in ms): runs that finished
    from ``GRACE_S`` before it on come again (at least once: a client dedupes by ``index`` and
    ``finished_at``). Without it (like a run's events): the events so far, as one JSON list, at
    once; a client that only polls is never held on an open stream."""
    _check_id(batch_id)
    store = _batches(request)
    batch = await store.get(tenant.name, batch_id)
    if "text/event-stream" not in request.headers.get("accept", ""):
        counts = await store.counts(batch.id)
        done = not any(RunStatus(s) not in _TERMINAL for s in counts)
        data = [_finished_event(batch.id, c) for c in await store.finished_since(batch.id, 0.0)]
        if done:
            data.append(await _batch_finished(store, batch, counts))
        return Response(json.dumps({"object": "list", "data": data, "finished": done}),
                        media_type="application/json")
    cursor: tuple[int, int] | None = None
    if last_event_id is not None:
        ms, _, index = last_event_id.partition("-")  # its pattern was checked
        cursor = (int(ms), int(index or -1))
    keepalive = request.app.state.settings.sse_keepalive_seconds
    return StreamingResponse(_events(store, batch, cursor, keepalive), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event_id(c: Completion) -> str:
    return f"{round(c.finished_at * 1000)}-{c.index}"


async def _events(store: BatchStore, batch: BatchRecord, cursor: tuple[int, int] | None,
                  keepalive: float) -> AsyncIterator[str]:
    """Poll the batch's finished runs. The counts are read before the completions: when they show
    no active run, the completions read after them hold every run, and the stream ends. A stream
    that did not resume reads them all that last time, so it reports every run exactly once,
    also one whose outcome was committed later than ``GRACE_S`` after its ``finished_at``."""
    sent: set[tuple[int, float]] = set()
    since = 0.0 if cursor is None else cursor[0] / 1000 - GRACE_S
    idle = time.monotonic()
    yield "retry: 1000\n\n"
    while True:
        counts = await store.counts(batch.id)
        done = not any(RunStatus(s) not in _TERMINAL for s in counts)
        for c in await store.finished_since(batch.id, 0.0 if done and cursor is None else since):
            key = (c.index, c.finished_at)
            if key in sent or (cursor is not None and (round(c.finished_at * 1000), c.index) == cursor):
                continue
            sent.add(key)
            yield f"id: {_event_id(c)}\nevent: batch.run_finished\ndata: {json.dumps(_finished_event(batch.id, c))}\n\n"
            since = max(since, c.finished_at - GRACE_S)
            idle = time.monotonic()
        if done:
            yield f"event: batch.finished\ndata: {json.dumps(await _batch_finished(store, batch, counts))}\n\n"
            return
        if time.monotonic() - idle >= keepalive:
            yield ": keep-alive\n\n"
            idle = time.monotonic()
        await asyncio.sleep(POLL_S)


def _finished_event(batch_id: str, c: Completion) -> dict[str, Any]:
    return {"object": "batch.event", "type": "batch.run_finished", "batch_id": batch_id, "index": c.index,
            "run_id": c.run_id, "status": c.status, "finished_at": c.finished_at}


async def _batch_finished(store: BatchStore, batch: BatchRecord, counts: dict[str, int]) -> dict[str, Any]:
    batch = await store.get(batch.tenant, batch.id)  # its state as it ends (a cancel may have come)
    return {"object": "batch.event", "type": "batch.finished", "batch_id": batch.id,
            "status": batch_status(batch, counts), "counts": {"total": batch.total, **counts}}


_TERMINAL = frozenset(s for s in RunStatus if s.terminal)

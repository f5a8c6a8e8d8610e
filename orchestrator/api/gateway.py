"""The OpenAI-compatible gateway: existing agents change only their base URL.

``POST /v1/chat/completions`` with a program id (``program_id`` in the body, which is
where the ``openai`` client puts ``extra_body``, or an ``X-Program-Id`` header, as
ThunderAgent accepts it) goes through the program-aware scheduler; a request without
one is its own one-turn program. ``POST /v1/programs/{id}/release`` when the agent is
done; ``GET /v1/programs`` shows each program's phase, status, tokens, backend and steps;
``POST /v1/programs/{id}/tool`` is an optional tool-phase hint.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import Receive, Scope, Send

from orchestrator.api.fast import FastRoute, send_json
from orchestrator.api.schemas import ERROR_RESPONSES, ErrorBody
from orchestrator.api.strict_json import NotJSON, StrictJSONRoute, decode
from orchestrator.auth import Tenant, authenticate
from orchestrator.errors import APIError, Conflict, InvalidRequest, NotFound, ServiceUnavailable, ValidationFailed
from scheduler.backends import openai_wire as wire
from scheduler.backends.base import BackendError, BackendHTTPError, GenerateRequest, Generation, GenerationChunk
from scheduler.core import UnknownProgram
from scheduler.runtime import ProgramConflict, ProgramRuntime

UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorBody, "description": "No backend is configured (`no_backends`), or it failed"}}
router = APIRouter(prefix="/v1", tags=["gateway"], responses={**ERROR_RESPONSES, **UNAVAILABLE},
                   route_class=StrictJSONRoute)
TenantDep = Annotated[Tenant, Depends(authenticate)]
ROLES = {"system", "developer", "user", "assistant", "tool"}
# What ``_check_messages`` enforces, for the OpenAPI document; not the one thing JSON Schema
# cannot say: a tool message answers a call of an earlier assistant message.
TOOL_CALL_SCHEMA: dict[str, Any] = {"type": "object", "required": ["id", "function"], "properties": {
    "id": {"type": "string"}, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "arguments": {"type": "string"}}}}}
MESSAGE_RULES: dict[str, Any] = {"allOf": [
    {"if": {"properties": {"role": {"const": "tool"}}},
     "then": {"required": ["tool_call_id"], "properties": {"tool_call_id": {"type": "string", "minLength": 1}}}},
    {"if": {"properties": {"role": {"not": {"const": "assistant"}}}},
     "then": {"properties": {"tool_calls": {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]}}}},
]}
DEFAULT_MAX_TOKENS = 512


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra=MESSAGE_RULES)
    role: str = Field(json_schema_extra={"enum": [*sorted(ROLES)]})
    content: Any = None
    tool_calls: list[dict[str, Any]] | None = Field(default=None, json_schema_extra={"items": TOOL_CALL_SCHEMA})
    tool_call_id: str | None = None


class ChatCompletionRequest(BaseModel):
    """The OpenAI chat completions body, plus ``program_id``."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    program_id: str | None = Field(default=None, min_length=1, max_length=200)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = Field(default=None, ge=1, description=(
        "At most `ORCH_MAX_TOKENS_CEILING` (32768 by default) and the backends' context length; default 512."))
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Wins over `max_tokens`.")
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None


class ToolHint(BaseModel):
    model_config = ConfigDict(strict=True)  # see orchestrator.api.strict_json
    phase: Literal["acting", "reasoning"]
    tool: str = Field(default="tool", min_length=1, max_length=100)


def _runtime(request: Request) -> ProgramRuntime:
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise ServiceUnavailable("No LLM backends are configured (set ORCH_BACKENDS).", code="no_backends")
    return runtime


def _chat_body(raw: bytes) -> ChatCompletionRequest:
    """The body, decoded by ``strict_json`` (NUL is fine here: the body is sent on, not stored)."""
    try:
        value = decode(raw, allow_nul=True)
    except NotJSON as exc:
        raise ValidationFailed(f"The body is not valid JSON: {exc}.", code="invalid_json") from None
    if not isinstance(value, dict):
        raise ValidationFailed("The body must be a JSON object.", code="invalid_request")
    try:
        return ChatCompletionRequest.model_validate(value, strict=True)  # see strict_json
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ValidationFailed(f"{first['msg']} at {loc}.", code="invalid_request", param=loc) from None


def _check_messages(body: ChatCompletionRequest) -> None:
    """Malformed tool-call messages get a 400 naming the field, never a backend error."""
    call_ids: set[str] = set()
    for i, m in enumerate(body.messages):
        if m.role not in ROLES:
            raise ValidationFailed(f"messages[{i}].role must be one of {sorted(ROLES)}.", code="invalid_message",
                                   param=f"messages[{i}].role")
        for j, tc in enumerate(m.tool_calls or []):
            fn = tc.get("function")  # tool_calls are dicts: the body was validated strictly
            if m.role != "assistant" or not isinstance(tc.get("id"), str) or not isinstance(fn, dict) \
                    or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments", ""), str):
                raise ValidationFailed(
                    "Tool calls belong to assistant messages and need an id and a function with a name and "
                    "string arguments.", code="invalid_tool_call", param=f"messages[{i}].tool_calls[{j}]")
            call_ids.add(tc["id"])
        if m.role == "tool":
            if not m.tool_call_id:
                raise ValidationFailed("A tool message needs tool_call_id.", code="invalid_tool_message",
                                       param=f"messages[{i}].tool_call_id")
            if m.tool_call_id not in call_ids:
                raise ValidationFailed(f"tool_call_id {m.tool_call_id!r} answers no earlier assistant tool call.",
                                       code="invalid_tool_message", param=f"messages[{i}].tool_call_id")


def _max_tokens(body: ChatCompletionRequest, ceiling: int, context: int | None) -> int:
    """The tokens the call may write: at most the ceiling (``ORCH_MAX_TOKENS_CEILING``) and the
    context length of the backends, where they report one. Without a bound a ``max_tokens`` of
    2**31 reached a backend and took it down (the calls after it got 503)."""
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    asked = getattr(body, field)
    if asked is None:
        return DEFAULT_MAX_TOKENS
    if context is not None and context < ceiling:
        limit, why = context, "the model's context length"
    else:
        limit, why = ceiling, "ORCH_MAX_TOKENS_CEILING"
    if asked > limit:
        raise ValidationFailed(f"{field} is {asked}; at most {limit} ({why}).", param=field)
    return asked


def _generate_request(body: ChatCompletionRequest, rid: str, max_tokens: int) -> GenerateRequest:
    try:
        return GenerateRequest(
            rid=rid, model=body.model, messages=[m.model_dump(exclude_none=True) for m in body.messages],
            tools=body.tools, tool_choice=body.tool_choice, max_tokens=max_tokens,
            temperature=body.temperature, top_p=body.top_p,
            stop=[body.stop] if isinstance(body.stop, str) else body.stop, seed=body.seed,
            logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0, stream=bool(body.stream))
    except ValidationError as exc:
        raise ValidationFailed(exc.errors()[0]["msg"], code="invalid_request") from None


async def chat_completions(scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /v1/chat/completions``: a plain ASGI route (``orchestrator.api.fast``), because this
    is the one call an agent makes per turn and the framework's share of it was the larger."""
    request = Request(scope, receive)
    tenant = await authenticate(request)
    x_program_id = request.headers.get("x-program-id") or None  # empty: no program id
    if x_program_id is not None and len(x_program_id) > 200:
        raise ValidationFailed("String should have at most 200 characters at x-program-id",
                               param="x-program-id")
    body = _chat_body(await request.body())
    _check_messages(body)
    runtime = _runtime(request)
    max_tokens = _max_tokens(body, request.app.state.settings.max_tokens_ceiling, runtime.max_context_tokens())
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    program_id = body.program_id or x_program_id
    one_shot = program_id is None
    program_id = program_id or f"oneshot-{rid}"
    gen_req = _generate_request(body, rid, max_tokens)
    try:
        runtime.claim(program_id, tenant.name, idle_release=not one_shot)
    except ProgramConflict:
        raise Conflict(f"Program id {program_id!r} is in use by another tenant.", code="program_id_conflict",
                       param="program_id") from None
    created, model = int(time.time()), body.model or "default"

    def done() -> None:
        if one_shot:
            try:
                runtime.release(program_id, tenant.name)
            except UnknownProgram:
                pass

    if body.stream:
        events = wire.ChunkEvents(rid, model, created, with_logprobs=body.logprobs,
                                  include_usage=bool((body.stream_options or {}).get("include_usage")))
        await _stream_events(events, runtime.stream(program_id, tenant.name, gen_req), done, receive, send)
        return

    async def collect() -> list[GenerationChunk]:
        return [chunk async for chunk in runtime.stream(program_id, tenant.name, gen_req)]

    try:
        chunks = await _unless_disconnected(receive, collect())
    except BackendError as exc:
        raise _backend_error(exc) from None
    except ClientGone:
        return  # the call was cancelled, which aborted it on the engine; nobody to answer
    finally:
        done()
    gen = Generation.from_chunks(rid, chunks)
    await send_json(send, 200, wire.completion(gen, id=rid, model=model, created=created,
                                               with_logprobs=body.logprobs))


async def _stream_events(events: wire.ChunkEvents, stream: AsyncGenerator[GenerationChunk, None],
                         done: Callable[[], None], receive: Receive, send: Send) -> None:
    """SSE chunks (``scheduler.backends.openai_wire``) as the backend streams. The first chunk
    comes before the 200, so a dead backend is a clean error status; a client that goes away
    aborts the call on the engine."""
    try:
        try:
            first = await _unless_disconnected(receive, anext(stream))
        except BackendError as exc:
            raise _backend_error(exc) from None
        except StopAsyncIteration:
            first = None
        except ClientGone:
            return  # gone while the call waited (held, queued, prefilling): aborted, not run
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]})

        async def write() -> bytes:
            """Send the chunks as they come; the last (the one with the finish reason) is returned,
            to go out with ``[DONE]`` and the end of the body in one write."""
            chunk, out = first, events.first()  # the role event goes out with the first chunk's
            try:
                while chunk is not None:
                    if chunk.finish_reason is not None:
                        return out + events.event(chunk) + wire.DONE
                    await send({"type": "http.response.body", "body": out + events.event(chunk), "more_body": True})
                    chunk, out = await anext(stream, None), b""
                return out + wire.DONE
            except BackendError as exc:
                return wire.sse(_backend_error(exc).body())

        try:
            tail = await _unless_disconnected(receive, write())
        except ClientGone:
            return  # the stream was cancelled mid-way, which aborts the call on its engine
        await send({"type": "http.response.body", "body": tail, "more_body": False})
    finally:
        await stream.aclose()  # at once: a call still running is aborted on its engine
        done()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


T = TypeVar("T")


async def _unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """``work``'s result, unless the client goes away first: then ``work`` is cancelled (a call
    cancelled is aborted on its engine, or never dispatched if it was held) and ``ClientGone``
    is raised. ``work`` runs in this task; one watcher task cancels it (cheaper per call than
    a task for each and ``asyncio.wait``)."""
    me = asyncio.current_task()
    assert me is not None
    gone = finished = False

    async def watch() -> None:
        nonlocal gone
        await _disconnected(receive)
        if not finished:  # the answer is not ready: stop the call
            gone = True
            me.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        result = await work
        finished = True
        return result
    except asyncio.CancelledError:
        if not gone:
            raise
        me.uncancel()
        raise ClientGone() from None
    finally:
        finished = True
        watcher.cancel()


CHAT_ROUTE = FastRoute("/v1/chat/completions", "POST", chat_completions, {
    "tags": ["gateway"], "summary": "OpenAI-compatible chat completion, scheduled as part of a program",
    "operationId": "chat_completions_v1_chat_completions_post",  # as FastAPI named it: generated clients
    "description": "The OpenAI chat completions body plus `program_id` (or an `X-Program-Id` header); "
                   "`stream: true` answers with server-sent events ending in `data: [DONE]`.",
    "parameters": [{"name": "x-program-id", "in": "header", "required": False,
                    "schema": {"type": "string", "maxLength": 200}}],
    "requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}},
    "responses": {"200": {"description": "A `chat.completion`, or `chat.completion.chunk` events", "links": {
                      name: {"operationId": op, "parameters": {"program_id": "$request.body#/program_id"}}
                      for name, op in [("GetProgram", "get_program_v1_programs__program_id__get"),
                                       ("ToolHint", "tool_hint_v1_programs__program_id__tool_post"),
                                       ("ReleaseProgram", "release_program_v1_programs__program_id__release_post")]},
                  "content": {
                      "application/json": {"schema": {"type": "object"}},
                      "text/event-stream": {"schema": {  # one event: a chunk as JSON, or [DONE]
                          "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}}}},
                  **{str(code): {"description": r["description"], "content": {"application/json": {
                      "schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
                     for code, r in {**ERROR_RESPONSES, **UNAVAILABLE}.items()}},
})
FAST_ROUTES = [CHAT_ROUTE]
FAST_SCHEMAS = [ChatCompletionRequest]


# A backend's refusal of the request itself (say, a prompt longer than the model's context): the
# caller's to fix, so a 400 carrying the backend's reason, not a 503 that invites a retry.
_REQUEST_FAULTS = frozenset({400, 413, 422})


def _backend_error(exc: BackendError) -> APIError:
    if isinstance(exc, BackendHTTPError) and exc.status in _REQUEST_FAULTS:
        return InvalidRequest(f"The LLM backend refused the request: {exc}", code="backend_rejected_request")
    return ServiceUnavailable(f"The LLM backend failed: {exc}", code="backend_unavailable")


@router.post("/programs/{program_id}/release", summary="The agent is done: free its program")
async def release_program(program_id: str, request: Request, tenant: TenantDep) -> dict[str, Any]:
    try:
        _runtime(request).release(program_id, tenant.name)
    except UnknownProgram:
        raise NotFound(f"No program with id {program_id!r}.", code="program_not_found",
                       param="program_id") from None
    return {"id": program_id, "object": "program", "released": True}


@router.post("/programs/{program_id}/tool", summary="Tool-phase hint: the program starts or ends a tool call")
async def tool_hint(program_id: str, hint: ToolHint, request: Request, tenant: TenantDep) -> dict[str, Any]:
    runtime = _runtime(request)
    try:
        if hint.phase == "acting":
            runtime.tool_started(program_id, tenant.name, hint.tool)
        else:
            runtime.tool_ended(program_id, tenant.name)
    except UnknownProgram:
        raise NotFound(f"No program with id {program_id!r}.", code="program_not_found",
                       param="program_id") from None
    return {"id": program_id, "object": "program", "phase": hint.phase}


@router.get("/programs", summary="Programs of this tenant: phase, status, tokens, backend, steps")
async def list_programs(request: Request, tenant: TenantDep) -> dict[str, Any]:
    return {"object": "list", "data": _runtime(request).programs(tenant.name)}


@router.get("/programs/{program_id}", summary="One program")
async def get_program(program_id: str, request: Request, tenant: TenantDep) -> dict[str, Any]:
    for p in _runtime(request).programs(tenant.name):
        if p["id"] == program_id:
            return p
    raise NotFound(f"No program with id {program_id!r}.", code="program_not_found", param="program_id")

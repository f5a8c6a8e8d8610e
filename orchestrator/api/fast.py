"""Plain ASGI routes for the hot path, ahead of FastAPI.

Why: an OpenAI-compatible call through the gateway should add well under a millisecond to the
backend's own latency, and profiling put about half of the service's own time per call in the
framework (route matching over every route, dependency solving, ``jsonable_encoder`` of the
response) rather than in the call. A route here is an ``async (scope, receive, send)``
function; it answers errors with the same ``{"error": ...}`` body as the FastAPI handlers (see
``orchestrator.errors``), and still runs inside ``RequestContextMiddleware`` (request id,
access log, HTTP metrics under its path, and the 500 of an unexpected exception). Its OpenAPI
entry is written by ``document``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import Receive, Scope, Send

from orchestrator.errors import APIError

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class FastRoute:
    path: str
    method: str
    handler: Handler
    # The operation object for the OpenAPI document; ``None``: a FastAPI route of the same path
    # and method documents it (and the path's other methods go on to FastAPI's router).
    openapi: dict[str, Any] | None


class MethodNotAllowed(APIError):
    status_code = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


async def send_json(send: Send, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
    body = json_bytes(obj)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, err: APIError) -> None:
    await send_json(send, err.status_code, err.body(), err.headers)


class FastRoutes:
    """Serve the listed (path, method) pairs directly, inside ``RequestContextMiddleware``;
    ``ServiceApp`` sends every other request to FastAPI's stack.

    Why in front of FastAPI rather than as one of its middlewares: FastAPI wraps every request in
    its own layers (Starlette's error middleware and its send wrapper, the telemetry check, the
    body-limit layer) before any user middleware runs; for the gateway's call that was a tenth of
    the service's CPU per call, and this path's errors are answered here anyway."""

    def __init__(self, routes: list[FastRoute]) -> None:
        self.routes: dict[str, dict[str, FastRoute]] = {}
        for r in routes:
            self.routes.setdefault(r.path, {})[r.method] = r

    def serves(self, scope: Scope) -> bool:
        """Is this request one of ours: a listed path with a listed method, or a listed path no
        FastAPI route shares (then any other method is our ``405``)?"""
        if scope["type"] != "http":
            return False
        # with or without a trailing slash (FastAPI would redirect one; an SDK base URL ending in
        # "/" can produce it)
        methods = self.routes.get(scope["path"].rstrip("/") or "/")
        if methods is None:
            return False
        return scope["method"] in methods or not any(r.openapi is None for r in methods.values())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        methods = self.routes[scope["path"].rstrip("/") or "/"]
        route = methods.get(scope["method"])
        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        scope["route"] = route or next(iter(methods.values()))  # the HTTP metrics label it by its path
        try:
            if route is None:
                raise MethodNotAllowed("Method Not Allowed", headers={"allow": ", ".join(sorted(methods))})
            await route.handler(scope, receive, tracking_send)
        except APIError as err:
            if started:
                raise
            await send_error(send, err)


def document(schema: dict[str, Any], routes: list[FastRoute]) -> None:
    """Add the fast routes' operations to an OpenAPI document."""
    for r in routes:
        if r.openapi is not None:
            schema.setdefault("paths", {}).setdefault(r.path, {})[r.method.lower()] = r.openapi

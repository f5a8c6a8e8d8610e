"""ASGI middleware: request id, body limits, unhandled errors, access log and HTTP metrics.

Written as plain ASGI (not ``BaseHTTPMiddleware``) so streamed responses such as
SSE pass through untouched.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.api.fast import send_error
from orchestrator.errors import APIError, PayloadTooLarge, RequestTimeout, ValidationFailed
from orchestrator.logs import now_ms, request_id_var
from orchestrator.metrics import Metrics

log = logging.getLogger("orchestrator.access")
errors_log = logging.getLogger("orchestrator.errors")
CLIENT_GONE = 499  # the status logged for a client that left before its request was read (nginx's)


class ClientGone(Exception):
    """The client disconnected before it had sent its body."""


class RequestContextMiddleware:
    """Outermost of the service's middleware, so that everything it answers, errors included,
    carries ``x-request-id`` and every log line of a request its id:

    - the whole body is read here, under ``max_body_bytes`` (else ``413``) and within
      ``body_timeout_s`` of the first read (else ``408``, and the connection is closed): uvicorn
      bounds neither, so a body shorter than its ``Content-Length``, or sent a byte at a time,
      would hold a connection and a task for as long as the client liked;
    - a query parameter holding NUL is refused (``422 unsupported_value``): PostgreSQL text
      cannot hold it, so compared with a column it failed as a 500;
    - an exception no handler took is logged with the request id and answered ``500``
      ``internal_error`` (when no response has started; otherwise the connection is dropped).
      FastAPI's own catch-all sits outside every middleware: its 500s had neither.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}  # the HTTP metrics' children

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        token = request_id_var.set(rid)
        start = time.perf_counter()
        status = 500
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            _check_query(scope["query_string"])
            body = await self._read_body(headers, receive)
            await self.app(scope, replay_body(receive, body) if body is not None else receive, send_wrapper)
        except ClientGone:
            status = CLIENT_GONE
        except Exception as exc:
            err = exc if isinstance(exc, APIError) else None  # an APIError: refused by the checks above
            if started or err is None:
                errors_log.exception("unhandled error")
            if started:
                raise  # the server drops the connection: the client sees a cut response, not a whole one
            await send_error(send_wrapper, err or APIError("Internal error; the request id identifies it in the logs."))
        finally:
            method, path = scope["method"], getattr(scope.get("route"), "path", "unmatched")
            key = (method, path, status)
            series = self._series.get(key)
            if series is None:  # bounded: route paths (or "unmatched") x parsed methods x statuses
                series = self._series[key] = (self.metrics.http_requests.labels(method, path, str(status)),
                                              self.metrics.http_duration.labels(method, path))
            series[0].inc()
            series[1].observe(time.perf_counter() - start)
            if log.isEnabledFor(logging.INFO):
                log.info("request", extra={"method": method, "path": scope["path"], "status": status,
                                           "duration_ms": now_ms(start)})
            request_id_var.reset(token)

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes | None:
        """The whole body, or ``None`` for a request without one (nothing to wait for)."""
        length = headers.get(b"content-length")
        if length is None and b"transfer-encoding" not in headers:
            return None
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            raise self._too_large()
        try:
            async with asyncio.timeout(self.body_timeout_s):
                return await self._receive_body(receive)
        except TimeoutError:
            raise RequestTimeout(f"The request body was not received within {self.body_timeout_s:g} s.",
                                 headers={"Connection": "close"}) from None

    async def _receive_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                raise ClientGone()
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                raise self._too_large()
            if not msg.get("more_body"):
                return b"".join(chunks)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"Request body exceeds the limit of {self.max_body} bytes.")


def _check_query(query_string: bytes) -> None:
    """Refuse a query parameter that decodes to a string holding NUL (``%00``)."""
    if b"%00" not in query_string:
        return
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if "\x00" in name or "\x00" in value:
            raise ValidationFailed("Query parameters may not contain NUL (%00), which PostgreSQL cannot store.",
                                   code="unsupported_value", param=name.replace("\x00", "") or None)


def replay_body(receive: Receive, body: bytes) -> Receive:
    """Replay a buffered body once, then pass through (for disconnect messages)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay

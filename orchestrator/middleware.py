"""ASGI middleware: request id, body-size limit, access log and HTTP metrics.

Written as plain ASGI (not ``BaseHTTPMiddleware``) so streamed responses such as
SSE pass through untouched.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.errors import PayloadTooLarge
from orchestrator.logs import now_ms, request_id_var
from orchestrator.metrics import Metrics

log = logging.getLogger("orchestrator.access")


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        token = request_id_var.set(rid)
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            too_large, body = await self._check_size(scope, headers, receive)
            if too_large:
                await self._reject(send_wrapper)
            else:
                await self.app(scope, replay_body(receive, body) if body is not None else receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            method = scope["method"]
            self.metrics.http_requests.labels(method, path, str(status)).inc()
            self.metrics.http_duration.labels(method, path).observe(time.perf_counter() - start)
            log.info("request", extra={"method": method, "path": scope["path"], "status": status,
                                       "duration_ms": now_ms(start)})
            request_id_var.reset(token)

    async def _check_size(
        self, scope: Scope, headers: dict[bytes, bytes], receive: Receive
    ) -> tuple[bool, bytes | None]:
        """Reject by Content-Length, or buffer a chunked body up to the limit."""
        length = headers.get(b"content-length")
        if length is not None:
            try:
                return int(length) > self.max_body, None
            except ValueError:
                return True, None
        if scope["method"] in ("POST", "PUT", "PATCH") and b"transfer-encoding" in headers:
            chunks, size = [], 0
            while True:
                msg = await receive()
                if msg["type"] != "http.request":
                    break
                chunks.append(msg.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_body:
                    return True, None
                if not msg.get("more_body"):
                    break
            return False, b"".join(chunks)
        return False, None

    async def _reject(self, send: Send) -> None:
        err = PayloadTooLarge(f"Request body exceeds the limit of {self.max_body} bytes.")
        body = json.dumps(err.body()).encode()
        await send({"type": "http.response.start", "status": err.status_code,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


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

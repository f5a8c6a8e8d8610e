"""A lean HTTP/1.1 client for the gateway's hot path: plain ``http://``, keep-alive, streamed bodies.

Why not httpx here: every gateway call is one POST to an SGLang server on the cluster network
and a stream of SSE lines back, and profiling the service put about 60 % of its own time per
call in httpx, httpcore and anyio (request models, the transport's locks and cancel scopes, a
line decoder in Python). This client is an ``asyncio.Protocol`` feeding llhttp (``httptools``,
the parser uvicorn runs on) and hands body chunks to the reader: a few microseconds of Python
per chunk. It does only what that path needs (no TLS, no redirects, no proxies, no cookies); the
rest of a backend's calls (observation, metrics, abort) stay on httpx.

Failures are the typed errors of ``_http.mapped_errors`` (``ConnectFailed``, ``ReadTimedOut``,
``ConnectionLost``), which turns them into the backend errors. A reused connection that the
server had closed before it sent any byte of the response is retried once on a new connection,
as httpx and urllib3 do (the server never saw the request, or dropped it unanswered).
"""

from __future__ import annotations

import asyncio
import collections
import json
from types import TracebackType
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httptools


class HTTPTransportFailure(Exception):
    """Base of this client's transport failures (``_http.mapped_errors`` maps them)."""


class ConnectFailed(HTTPTransportFailure):
    pass


class ReadTimedOut(HTTPTransportFailure):
    pass


class ConnectionLost(HTTPTransportFailure):
    pass


_PAUSE_ABOVE = 1 << 20  # buffered body bytes before the socket stops being read


class _Connection(asyncio.Protocol):
    """One TCP connection; one request and its response at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.keep_alive = False
        self.complete = False
        self.got_bytes = False
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.error: Exception | None = None
        self.waiter: asyncio.Future[None] | None = None

    # ---- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = ConnectionLost(f"malformed HTTP response: {exc}")
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and not self.complete and exc is None and self._until_eof():
            self.complete = True  # a body without length or chunks ends with the connection
        if not self.complete and self.error is None:
            self.error = ConnectionLost(f"connection closed by the server{f': {exc}' if exc else ''}")
        self._wake()

    # ---- llhttp callbacks -----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it once the message ends
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _PAUSE_ABOVE and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True

    def _until_eof(self) -> bool:
        names = {name for name, _ in self.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    # ---- used by the response ---------------------------------------------------------------

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self, timeout: float) -> None:  # noqa: ASYNC109 (the read timeout, per wait)
        """Until more of the response arrived (or it ended, or failed)."""
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        timer = loop.call_later(timeout, _expire, self.waiter)
        try:
            await self.waiter
        finally:
            timer.cancel()
            self.waiter = None

    def take(self) -> bytes:
        data = b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()
        return data

    def reusable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(ReadTimedOut("no response data within the read timeout"))


class Response:
    """A response whose body is read as it arrives. Leaving the ``async with`` before the end
    closes the connection (how a stopped reader tells SGLang to abort the request); read to the
    end, the connection goes back to the pool."""

    def __init__(self, pool: Http1Pool, conn: _Connection) -> None:
        self._pool = pool
        self._conn = conn
        self.status_code = conn.status
        self.headers = dict(conn.headers)

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            if conn.chunks:
                yield conn.take()
                continue
            if conn.complete:
                return
            if conn.error is not None:
                raise conn.error
            await conn.wait(self._pool.read_timeout)

    async def aiter_lines(self) -> AsyncIterator[str]:
        """Body lines without their ``\\n`` (a ``\\r`` before it dropped too)."""
        rest = b""
        async for data in self.aiter_bytes():
            if rest:
                data = rest + data
            *lines, rest = data.split(b"\n")
            for line in lines:
                yield (line[:-1] if line.endswith(b"\r") else line).decode(errors="replace")
        if rest:
            yield rest.decode(errors="replace")

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_bytes()])

    def _finish(self) -> None:
        conn = self._conn
        if conn.complete and not conn.chunks and conn.keep_alive and conn.reusable():
            self._pool._give_back(conn)
        else:
            conn.close()


class _StreamContext:
    def __init__(self, pool: Http1Pool, method: str, path: str, body: bytes) -> None:
        self._pool, self._method, self._path, self._body = pool, method, path, body
        self._response: Response | None = None

    async def __aenter__(self) -> Response:
        self._response = await self._pool._send(self._method, self._path, self._body)
        return self._response

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._response is not None:
            self._response._finish()


class Http1Pool:
    """Keep-alive connections to one ``http://host:port``.

    ``connects`` counts TCP connections opened (a test checks that calls reuse them)."""

    def __init__(self, base_url: str, *, connect_timeout: float = 5.0, read_timeout: float = 120.0,
                 max_idle: int = 64) -> None:
        url = urlsplit(base_url)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"Http1Pool speaks plain http://host[:port] only, not {base_url!r}")
        self.host, self.port = url.hostname, url.port or 80
        self.prefix = url.path.rstrip("/")
        self.connect_timeout, self.read_timeout, self.max_idle = connect_timeout, read_timeout, max_idle
        self._host_header = url.netloc.encode()
        self._idle: list[_Connection] = []
        self._closed = False
        self.connects = 0

    def stream(self, method: str, path: str, *, json_body: Any) -> _StreamContext:
        return _StreamContext(self, method, path, json.dumps(json_body).encode())

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Connection, self.host, self.port), self.connect_timeout)
        except TimeoutError:
            raise ConnectFailed(f"connect to {self.host}:{self.port} timed out") from None
        except OSError as exc:
            raise ConnectFailed(f"connect to {self.host}:{self.port}: {exc}") from None
        self.connects += 1
        return conn

    def _checkout(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable():
                return conn
        return None

    def _give_back(self, conn: _Connection) -> None:
        if not self._closed and len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            conn.close()

    async def _send(self, method: str, path: str, body: bytes) -> Response:
        head = (f"{method} {self.prefix}{path} HTTP/1.1\r\nHost: ").encode() + self._host_header + (
            b"\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n")
        conn = self._checkout()
        reused = conn is not None
        while True:
            if conn is None:
                conn = await self._connect()
            conn._reset()
            assert conn.transport is not None
            conn.transport.write(head + body)
            try:
                while not conn.headers_done:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(self.read_timeout)
            except ConnectionLost:
                conn.close()
                if reused and not conn.got_bytes:
                    conn, reused = None, False  # a stale keep-alive connection: once on a new one
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            return Response(self, conn)

    async def aclose(self) -> None:
        """Close the idle connections; one still streaming is closed when its response ends."""
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()

"""HTTP plumbing shared by backends that speak to a server: error mapping and SSE lines."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator
from typing import Any

import httpx

from scheduler.backends._http1 import ConnectFailed, ConnectionLost, Http1Pool, ReadTimedOut
from scheduler.backends.base import BackendHTTPError, BackendTimeout, BackendUnavailable, StreamInterrupted


@asynccontextmanager
async def mapped_errors(backend: str, *, streamed: list[bool] | None = None) -> AsyncIterator[None]:
    """Turn httpx (and ``_http1``) failures into the typed backend errors.

    ``streamed`` is a one-item flag the caller sets once output has been yielded: a
    failure after that point is ``StreamInterrupted`` (not safe to retry blindly).
    """
    try:
        yield
    except (httpx.TimeoutException, ReadTimedOut) as exc:
        if streamed and streamed[0]:
            raise StreamInterrupted(f"{backend}: stream timed out: {exc}", backend=backend) from exc
        raise BackendTimeout(f"{backend}: timed out: {exc}", backend=backend) from exc
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, ConnectFailed,
            ConnectionLost) as exc:
        if streamed and streamed[0]:
            raise StreamInterrupted(f"{backend}: stream broke: {exc}", backend=backend) from exc
        raise BackendUnavailable(f"{backend}: {type(exc).__name__}: {exc}", backend=backend) from exc
    except httpx.TransportError as exc:
        raise BackendUnavailable(f"{backend}: {type(exc).__name__}: {exc}", backend=backend) from exc


def stream_post(client: httpx.AsyncClient, pool: Http1Pool | None, path: str, body: dict[str, Any]) -> Any:
    """``async with`` a streamed POST: on the lean pool when there is one, else on httpx."""
    if pool is not None:
        return pool.stream("POST", path, json_body=body)
    return client.stream("POST", path, json=body)


async def raise_for_status(response: Any, backend: str) -> None:
    if response.status_code >= 400:
        body = (await response.aread()).decode(errors="replace")[:500]
        raise BackendHTTPError(f"{backend}: HTTP {response.status_code}: {body}", status=response.status_code,
                               backend=backend)


async def sse_json(response: Any) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of an SSE response, up to ``data: [DONE]``.

    The body is read to its end after ``[DONE]`` (the chunked terminator follows it): a response
    left unfinished closes its connection, and every call would pay a new TCP connect."""
    done = False
    async for line in response.aiter_lines():
        if done or not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            done = True
            continue
        yield json.loads(payload)

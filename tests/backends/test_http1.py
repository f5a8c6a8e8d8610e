"""The lean HTTP/1.1 client against raw TCP servers on loopback that misbehave on purpose.

A real server (``asyncio.start_server``) answers with bytes chosen per test: content-length and
chunked bodies, a keep-alive connection the server closes while it is idle (the next call must
go through on a new connection), a silent server (read timeout), garbage (a parse error), a
refused port, and a body far larger than the pause threshold (flow control)."""

from __future__ import annotations

import asyncio
import json
import socket
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

import pytest

from scheduler.backends._http import mapped_errors, raise_for_status
from scheduler.backends._http1 import ConnectFailed, ConnectionLost, Http1Pool, ReadTimedOut
from scheduler.backends.base import BackendHTTPError, BackendTimeout, BackendUnavailable

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length"))
    body = json.loads(await reader.readexactly(length))
    return lines[0], body


async def serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


@asynccontextmanager
async def pool_on(handler: Handler, path: str = "") -> AsyncIterator[Http1Pool]:
    """A server answering with ``handler`` and a pool on it (at ``path``), both closed after."""
    server, url = await serve(handler)
    pool = Http1Pool(url + path)
    try:
        yield pool
    finally:
        await pool.aclose()
        server.close()


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


async def test_keep_alive_chunked_and_content_length_bodies_and_the_request_line() -> None:
    seen: list[tuple[str, dict]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                line, body = await read_request(reader)
            except asyncio.IncompleteReadError:
                break
            seen.append((line, body))
            if body["n"] % 2:
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             + chunked(b"data: {\"a\": 1}\n", b"\ndata: [DO", b"NE]\n\n"))
            else:
                payload = b"line one\r\nline two"
                writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
            await writer.drain()
        writer.close()

    async with pool_on(handler, "/prefix") as pool:
        for n in range(4):
            async with pool.stream("POST", "/v1/x", json_body={"n": n}) as resp:
                lines = [line async for line in resp.aiter_lines()]
            if n % 2:
                assert resp.status_code == 200 and lines == ['data: {"a": 1}', "", "data: [DONE]", ""]
            else:
                assert resp.status_code == 201 and lines == ["line one", "line two"]
        assert pool.connects == 1
        assert [line for line, _ in seen] == ["POST /prefix/v1/x HTTP/1.1"] * 4
        assert [b["n"] for _, b in seen] == [0, 1, 2, 3]


async def test_a_connection_the_server_closed_while_idle_is_replaced_once() -> None:
    calls = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        await read_request(reader)
        calls += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # no Connection: close header: the client learns it only on reuse

    async with pool_on(handler) as pool:
        for _ in range(3):
            async with pool.stream("POST", "/", json_body={}) as resp:
                assert await resp.aread() == b"ok"
            await asyncio.sleep(0.05)  # the server's FIN arrives while the connection is idle
        assert calls == 3 and pool.connects == 3


async def test_a_stale_connection_found_only_by_writing_is_retried_on_a_new_one() -> None:
    """The server drops the second request on a kept-alive connection without answering: it was
    never processed, so the client sends it once more on a new connection."""
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await read_request(reader)
        served += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        try:
            await read_request(reader)  # the next request on this connection: dropped unanswered
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    async with pool_on(handler) as pool:
        for _ in range(2):
            async with pool.stream("POST", "/", json_body={}) as resp:
                assert await resp.aread() == b"ok"
        assert served == 2 and pool.connects == 2


async def test_a_response_cut_after_its_headers_is_an_error_not_a_retry() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        writer.close()

    async with pool_on(handler) as pool:
        got = []
        with pytest.raises(ConnectionLost):
            async with pool.stream("POST", "/", json_body={}) as resp:
                async for chunk in resp.aiter_bytes():
                    got.append(chunk)
        assert got == [b"hello"] and pool._idle == []
        streamed = [True]
        with pytest.raises(Exception) as err:  # mapped: after output it is StreamInterrupted
            async with mapped_errors("b", streamed=streamed):
                async with pool.stream("POST", "/", json_body={}) as resp:
                    await resp.aread()
        assert type(err.value).__name__ == "StreamInterrupted"


async def test_silence_times_out_garbage_fails_to_parse_and_a_closed_port_is_refused() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SPDY/9 what\r\n\r\n")
        await writer.drain()

    s1, url1 = await serve(silent)
    s2, url2 = await serve(garbage)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    try:
        with pytest.raises(BackendTimeout):
            async with mapped_errors("b"):
                async with Http1Pool(url1, read_timeout=0.2).stream("POST", "/", json_body={}) as resp:
                    await resp.aread()
        with pytest.raises(ReadTimedOut):
            async with Http1Pool(url1, read_timeout=0.2).stream("POST", "/", json_body={}):
                pass
        with pytest.raises(BackendUnavailable, match="malformed"):
            async with mapped_errors("b"):
                async with Http1Pool(url2).stream("POST", "/", json_body={}) as resp:
                    await resp.aread()
        with pytest.raises(ConnectFailed):
            async with Http1Pool(f"http://127.0.0.1:{closed_port}").stream("POST", "/", json_body={}):
                pass
        with pytest.raises(BackendUnavailable):
            async with mapped_errors("b"):
                async with Http1Pool(f"http://127.0.0.1:{closed_port}").stream("POST", "/", json_body={}):
                    pass
        with pytest.raises(ValueError, match="plain http"):
            Http1Pool("https://example.com")
    finally:
        s1.close()
        s2.close()


async def test_an_error_status_is_read_and_raised_and_a_big_body_is_flow_controlled() -> None:
    big = b"x" * (5 << 20)  # five times the pause threshold

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                _, body = await read_request(reader)
            except asyncio.IncompleteReadError:
                break
            if body.get("fail"):
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big))
                writer.write(big)
            await writer.drain()
        writer.close()

    async with pool_on(handler) as pool:
        with pytest.raises(BackendHTTPError, match="503: busy") as err:
            async with pool.stream("POST", "/", json_body={"fail": True}) as resp:
                await raise_for_status(resp, "b")
        assert err.value.retryable
        async with pool.stream("POST", "/", json_body={}) as resp:
            await asyncio.sleep(0.3)  # a slow reader: the socket is paused near the threshold
            assert resp._conn.paused and (1 << 20) < resp._conn.buffered <= (1 << 20) + (1 << 18)
            size = 0
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
        assert size == len(big) and pool.connects == 1 and len(pool._idle) == 1


async def test_a_body_ended_by_closing_bad_utf8_and_a_closed_pool() -> None:
    """A response with neither length nor chunks ends with its connection (some proxies send
    them); a byte that is not UTF-8 is replaced, not raised; a stream that ends after the pool
    was closed closes its connection instead of parking it."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, body = await read_request(reader)
        if body.get("eof"):
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\ndata: one\n\xffdata: two\n")
            await writer.drain()
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"ok")
        await writer.drain()

    async with pool_on(handler) as pool:
        async with pool.stream("POST", "/", json_body={"eof": True}) as resp:
            lines = [line async for line in resp.aiter_lines()]
        assert lines == ["data: one", "\ufffddata: two"] and pool._idle == []
        async with pool.stream("POST", "/", json_body={}) as resp:
            await pool.aclose()  # while this response is still arriving
            assert await resp.aread() == b"ok"
        assert pool._idle == [] and resp._conn.closed


async def test_the_sglang_client_keeps_token_ids_of_chunks_that_add_no_text() -> None:
    """/generate streams cumulative text and ids; a token can add no text yet (half of a UTF-8
    character), and its id must not be lost (a Retain resends the output ids)."""
    from scheduler.backends import GenerateRequest
    from scheduler.backends.sglang import SGLangBackend

    events = [{"text": "a", "output_ids": [5], "meta_info": {"finish_reason": None}},
              {"text": "a", "output_ids": [5, 6], "meta_info": {"finish_reason": None}},  # no new text
              {"text": "ab", "output_ids": [5, 6, 7], "meta_info": {
                  "finish_reason": {"type": "length"}, "prompt_tokens": 3, "completion_tokens": 3, "cached_tokens": 0}}]
    sse = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(sse))
        await writer.drain()

    server, url = await serve(handler)
    backend = SGLangBackend(url)
    try:
        gen = await backend.generate(GenerateRequest(input_ids=[1, 2, 3], max_tokens=3))
        assert gen.text == "ab" and gen.token_ids == [5, 6, 7]
    finally:
        await backend.close()
        server.close()

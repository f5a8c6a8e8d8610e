"""Backend failures over real loopback HTTP: down, 5xx, hang, a stream cut half way."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import AsyncContextManager, AsyncIterator

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from scheduler.backends import (
    BackendHTTPError, BackendTimeout, BackendUnavailable, GenerateRequest, StreamInterrupted,
)
from scheduler.backends.sglang import SGLangBackend
from tests.servers import serve_app


def misbehaving_app() -> FastAPI:
    app = FastAPI()

    @app.post("/generate")
    async def generate(body: dict) -> object:
        mode = body["text"]
        if mode == "500":
            return JSONResponse({"error": "boom"}, status_code=500)
        if mode == "hang":
            await asyncio.sleep(30)

        async def cut() -> AsyncIterator[str]:
            for i in range(3):
                yield "data: " + json.dumps({"text": "x" * (i + 1), "meta_info": {"finish_reason": None}}) + "\n\n"
                await asyncio.sleep(0.05)
            raise RuntimeError("server dies mid-stream")

        return StreamingResponse(cut(), media_type="text/event-stream")

    return app


def serve(app: FastAPI) -> AsyncContextManager[str]:
    return serve_app(app, force_exit=True)  # the stalling handlers keep connections open


async def test_backend_down_is_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connection refused
        backend = SGLangBackend(f"http://127.0.0.1:{port}")
        with pytest.raises(BackendUnavailable) as exc:
            await backend.generate(GenerateRequest(prompt="hi"))
        assert exc.value.retryable
        assert not await backend.health()
        await backend.close()


async def test_5xx_hang_and_cut_stream():
    async with serve(misbehaving_app()) as url:
        backend = SGLangBackend(url, read_timeout=0.5)
        with pytest.raises(BackendHTTPError) as err:
            await backend.generate(GenerateRequest(prompt="500"))
        assert err.value.status == 500 and err.value.retryable
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(BackendTimeout):
            await backend.generate(GenerateRequest(prompt="hang"))
        assert asyncio.get_running_loop().time() - t0 < 5  # bounded: the stream never hangs
        got = []
        with pytest.raises(StreamInterrupted) as cut:
            async for chunk in backend.stream(GenerateRequest(prompt="cut")):
                got.append(chunk.text)
        assert "".join(got) == "xxx" and not cut.value.retryable  # deltas from cumulative text
        await backend.close()


async def test_a_kept_alive_connection_closed_under_a_get_is_tried_again():
    """The server closes a kept-alive connection as the next request arrives on it (its
    keep-alive timeout racing the request): the observation's GETs go again on a new connection
    instead of reporting a live backend down."""
    served = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests_here = 0
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            requests_here += 1
            if requests_here > 1:  # the second request on a kept-alive connection: closed, unanswered
                writer.close()
                return
            path = head.split(b" ")[1].decode()
            served.append(path)
            body = json.dumps({"max_total_num_tokens": 1000, "max_req_input_len": 500} if path == "/get_server_info"
                              else {"loads": [{"num_running_reqs": 1}]} if path == "/v1/loads" else {}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    backend = SGLangBackend(f"http://127.0.0.1:{port}")
    try:
        assert await backend.health()
        assert await backend.health()  # its kept-alive connection is closed unanswered: once more
        assert (await backend.capacity()).max_total_tokens == 1000
        assert (await backend.load()).running == 1
        assert served == ["/health", "/health", "/get_server_info", "/v1/loads"]
    finally:
        await backend.close()
        server.close()
        await server.wait_closed()

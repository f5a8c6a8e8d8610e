"""The SGLang-compatible simulator server over real loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import httpx
import uvicorn

from scheduler.sim.cost import preset
from scheduler.sim.engine import EngineConfig
from scheduler.sim.script import AgentTraceScript, Turn
from scheduler.sim.server import create_app

SMOL = preset("smollm2-135m-cpu")  # slow model: ~50 ms a decode step, scaled by speed


@asynccontextmanager
async def sim_server(speed: float = 10.0, **kwargs: Any) -> AsyncIterator[httpx.AsyncClient]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(EngineConfig(cost=SMOL), speed=speed, **kwargs)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield client
    finally:
        server.should_exit = True
        await task


async def _sse(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in response.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


async def test_generate_stream_is_cumulative_and_repeat_is_cached() -> None:
    async with sim_server() as client:
        body = {"text": "The quick brown fox jumps over the lazy dog. " * 20, "sampling_params": {"max_new_tokens": 12, "ignore_eos": True},
                "stream": True}
        texts, last = [], {}
        async with client.stream("POST", "/generate", json=body) as r:
            async for chunk in _sse(r):
                texts.append(chunk["text"])
                last = chunk
        # one event per decode step; a slow reader may see several steps merged into one
        assert len(texts) >= 2 and all(b.startswith(a) and b != a for a, b in zip(texts, texts[1:]))
        assert len(texts[-1].split()) == 12
        meta = last["meta_info"]
        assert meta["finish_reason"]["type"] == "length" and meta["completion_tokens"] == 12
        assert meta["cached_tokens"] == 0 and meta["prompt_tokens"] > 100
        again = (await client.post("/generate", json={**body, "stream": False})).json()["meta_info"]
        assert again["cached_tokens"] == meta["prompt_tokens"] - 1


async def test_abort_mid_stream_and_loads() -> None:
    async with sim_server() as client:
        body = {"text": "hello", "rid": "long-1", "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}, "stream": True}
        finish, aborted = None, False
        async with client.stream("POST", "/generate", json=body) as r:
            async for chunk in _sse(r):
                if chunk["meta_info"]["completion_tokens"] >= 3 and not aborted:
                    aborted = True
                    loads = (await client.get("/v1/loads")).json()["loads"][0]
                    assert loads["num_running_reqs"] == 1 and loads["num_used_tokens"] > 0
                    assert (await client.post("/abort_request", json={"rid": "long-1"})).status_code == 200
                finish = chunk["meta_info"]["finish_reason"]
        assert finish == {"type": "abort", "message": "Aborted"}
        info = (await client.get("/get_server_info")).json()
        assert info["max_total_num_tokens"] == SMOL.kv_capacity_tokens
        loads = (await client.get("/v1/loads")).json()["loads"][0]
        assert loads["num_running_reqs"] == 0 and loads["max_total_num_tokens"] == SMOL.kv_capacity_tokens
        metrics = (await client.get("/metrics")).text
        for name in ("num_running_reqs", "num_queue_reqs", "token_usage", "cache_hit_rate", "prompt_tokens_total",
                     "generation_tokens_total", "cached_tokens_total"):
            assert f"sglang:{name}{{" in metrics
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/get_model_info")).json()["is_generation"] is True
        assert (await client.post("/flush_cache")).status_code == 200


async def test_chat_completions_usage_cached_tokens_and_tool_calls() -> None:
    script = AgentTraceScript([Turn(20, "bash", '{"cmd": "ls"}'), Turn(8)])
    async with sim_server(script=script) as client:
        messages = [{"role": "system", "content": "You are a coding agent. " * 30}, {"role": "user", "content": "Fix the bug."}]
        first = (await client.post("/v1/chat/completions", json={"model": "m", "messages": messages})).json()
        call = first["choices"][0]["message"]["tool_calls"][0]
        assert first["choices"][0]["finish_reason"] == "tool_calls" and call["function"]["name"] == "bash"
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        messages += [first["choices"][0]["message"], {"role": "tool", "tool_call_id": call["id"], "content": "a.py b.py"}]
        chunks = []
        async with client.stream("POST", "/v1/chat/completions", json={
                "model": "m", "messages": messages, "stream": True, "stream_options": {"include_usage": True}}) as r:
            chunks = [c async for c in _sse(r)]
        content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert len(content.split()) == 8
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
        usage = chunks[-1]["usage"]
        assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == 8
        assert usage["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 2


async def test_the_project_sglang_backend_works_against_the_simulator() -> None:
    from scheduler.backends.base import GenerateRequest
    from scheduler.backends.sglang import SGLangBackend

    async with sim_server() as client:
        backend = SGLangBackend(str(client.base_url))
        try:
            tools = [{"type": "function", "function": {"name": "bash", "parameters": {"type": "object"}}}]
            chat = await backend.generate(GenerateRequest(messages=[{"role": "user", "content": "list files"}],
                                                          tools=tools, tool_choice="required", max_tokens=64))
            assert chat.finish_reason == "tool_calls" and chat.tool_calls[0].name == "bash"
            prompt = "Summarise the repository layout in one line. " * 10
            first = await backend.generate(GenerateRequest(prompt=prompt, max_tokens=8, logprobs=True, top_logprobs=2))
            again = await backend.generate(GenerateRequest(prompt=prompt, max_tokens=8))
            assert first.usage.completion_tokens == len(first.logprobs) > 0 and first.text
            assert again.usage.cached_tokens == again.usage.prompt_tokens - 1 and again.text == first.text
            assert (await backend.capacity()).max_total_tokens == SMOL.kv_capacity_tokens
            assert (await backend.load()).running == 0 and await backend.health()
        finally:
            await backend.close()


async def test_the_sglang_backend_reuses_one_connection_for_consecutive_calls() -> None:
    """Each stream is read to its end (past ``[DONE]``), so its connection goes back to the pool;
    a stream closed early costs every call a new TCP connect (it did: ~2 ms a call). A stream the
    reader leaves early closes its connection (SGLang aborts a request whose client went away),
    and the next call opens a new one."""
    from scheduler.backends.base import GenerateRequest
    from scheduler.backends.sglang import SGLangBackend

    async with sim_server(speed=1000) as client:
        backend = SGLangBackend(str(client.base_url))
        assert backend._pool is not None
        try:
            for i in range(4):
                chat = await backend.generate(GenerateRequest(messages=[{"role": "user", "content": f"hi {i}"}],
                                                              max_tokens=4))
                raw = await backend.generate(GenerateRequest(prompt=f"count {i}", max_tokens=4))
                assert chat.usage.completion_tokens > 0 and raw.usage.completion_tokens > 0
            assert backend._pool.connects == 1 and len(backend._pool._idle) == 1
            stream = backend.stream(GenerateRequest(prompt="long " * 20, max_tokens=200))
            assert (await anext(stream)).text
            await stream.aclose()
            assert backend._pool._idle == []
            again = await backend.generate(GenerateRequest(prompt="after", max_tokens=4))
            assert again.usage.completion_tokens > 0 and backend._pool.connects == 2
        finally:
            await backend.close()

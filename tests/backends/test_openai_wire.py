"""The OpenAI wire format (``scheduler.backends.openai_wire``) as the ``openai`` client reads it.

Pure formatting, so no server: the bytes are parsed the way the client parses a response
(its own pydantic types, and its stream accumulator for the streamed case). The three servers
that use the module are tested over HTTP in tests/test_gateway.py, tests/local and tests/sim.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageFunctionToolCall

from scheduler.backends import openai_wire as wire
from scheduler.backends.base import Generation, GenerationChunk, TokenLogprob, ToolCall, Usage

USAGE = Usage(prompt_tokens=120, completion_tokens=9, cached_tokens=100)
LP = TokenLogprob(token="é", token_id=7, logprob=-0.5, top=[("é", -0.5), ("e", -1.25)])


def events(raw: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE body; every event is one ``data:`` line and a blank line."""
    assert raw.endswith(b"\n\n")
    out = []
    for block in raw.decode().split("\n\n")[:-1]:
        assert block.startswith("data: ") and "\n" not in block, block
        out.append(block[len("data: "):])
    return out


async def collect(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([part async for part in stream])


async def test_a_stream_reads_back_as_one_completion_with_tool_calls_logprobs_and_usage() -> None:
    chunks = [
        GenerationChunk(rid="r", text="héllo", logprobs=[LP]),
        GenerationChunk(rid="r", text=" wörld", logprobs=[LP]),
        GenerationChunk(rid="r", tool_calls=[ToolCall(id="call_a", name="shell", arguments='{"cmd": "ls"}')]),
        GenerationChunk(rid="r", tool_calls=[ToolCall(id="call_b", name="read", arguments='{"path": "a.py"}')],
                        finish_reason="tool_calls", usage=USAGE),
    ]

    async def source() -> AsyncIterator[GenerationChunk]:
        for c in chunks:
            yield c

    raw = await collect(wire.ChunkEvents("chatcmpl-1", "m", 1700000000, with_logprobs=True,
                                         include_usage=True).events(source()))
    assert "héllo".encode() in raw  # UTF-8, not \\u escapes
    payloads = events(raw)
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
    parsed = [ChatCompletionChunk.model_validate(json.loads(p)) for p in payloads[:-1]]
    assert parsed[0].choices[0].delta.role == "assistant" and parsed[0].choices[0].delta.content == ""
    assert [c.choices[0].delta.tool_calls[0].index for c in parsed if c.choices and c.choices[0].delta.tool_calls] \
        == [0, 1]  # numbered across the stream, not from 0 in each chunk
    usage_event = parsed[-1]
    assert usage_event.choices == [] and usage_event.usage is not None
    assert usage_event.usage.total_tokens == 129
    assert usage_event.usage.prompt_tokens_details and usage_event.usage.prompt_tokens_details.cached_tokens == 100
    assert all(c.id == "chatcmpl-1" and c.model == "m" and c.created == 1700000000 for c in parsed)

    state: ChatCompletionStreamState = ChatCompletionStreamState()
    for c in parsed:
        state.handle_chunk(c)
    final = state.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "héllo wörld"
    assert [(t.id, t.function.name, t.function.arguments) for t in choice.message.tool_calls or []] == [
        ("call_a", "shell", '{"cmd": "ls"}'), ("call_b", "read", '{"path": "a.py"}')]
    assert choice.logprobs is not None and [t.token for t in choice.logprobs.content or []] == ["é", "é"]
    top = (choice.logprobs.content or [])[0]
    assert top.bytes == list("é".encode()) and [t.token for t in top.top_logprobs] == ["é", "e"]


async def test_usage_is_sent_only_when_asked_and_logprobs_only_when_asked() -> None:
    async def source() -> AsyncIterator[GenerationChunk]:
        yield GenerationChunk(rid="r", text="hi", logprobs=[LP])
        yield GenerationChunk(rid="r", finish_reason="stop", usage=USAGE)

    payloads = events(await collect(wire.ChunkEvents("c", "m").events(source())))
    parsed = [json.loads(p) for p in payloads[:-1]]
    assert all("usage" not in p and p["choices"] for p in parsed)
    assert all(p["choices"][0]["logprobs"] is None for p in parsed)
    assert [p["choices"][0]["finish_reason"] for p in parsed] == [None, None, "stop"]


async def test_a_reader_that_leaves_early_closes_the_chunk_stream() -> None:
    """The servers abort the engine's request in the chunk stream's ``finally``: a client that
    goes away must reach it, not leave the request decoding for nobody."""
    closed = []

    async def source() -> AsyncIterator[GenerationChunk]:
        try:
            for i in range(1000):
                yield GenerationChunk(rid="r", text=f"t{i}")
        finally:
            closed.append(True)

    stream = wire.ChunkEvents("c", "m").events(source())
    assert b'"role":"assistant"' in await anext(stream)
    assert b'"t0"' in await anext(stream)
    await stream.aclose()
    assert closed == [True]


def test_a_completion_parses_as_the_clients_chat_completion() -> None:
    calls = [ToolCall(id="call_a", name="shell", arguments="{}")]
    with_calls = Generation(rid="r", text="", tool_calls=calls, finish_reason="tool_calls", usage=USAGE)
    body: dict[str, Any] = json.loads(wire.json_bytes(wire.completion(with_calls, id="c", model="m")))
    parsed = ChatCompletion.model_validate(body)
    assert body["choices"][0]["message"]["content"] is None  # beside tool calls, null
    call = (parsed.choices[0].message.tool_calls or [])[0]
    assert isinstance(call, ChatCompletionMessageFunctionToolCall) and call.function.name == "shell"
    details = parsed.usage.prompt_tokens_details if parsed.usage else None
    assert details is not None and details.cached_tokens == 100
    assert parsed.choices[0].logprobs is None and "index" not in body["choices"][0]["message"]["tool_calls"][0]

    empty = Generation(rid="r", text="", logprobs=[LP], finish_reason="length", usage=USAGE)
    body = wire.completion(empty, id="c", model="m", with_logprobs=True)
    parsed = ChatCompletion.model_validate(body)
    assert parsed.choices[0].message.content == "" and parsed.choices[0].finish_reason == "length"
    assert parsed.choices[0].logprobs and [t.logprob for t in parsed.choices[0].logprobs.content or []] == [-0.5]

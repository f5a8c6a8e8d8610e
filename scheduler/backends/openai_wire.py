"""The OpenAI chat-completions wire format, written once.

Why: three servers answer ``/v1/chat/completions`` from what a ``Backend`` yields: the gateway
(``orchestrator.api.gateway``), the local CPU engine's server (``scheduler.local.server``) and
the SGLang simulator's server (``scheduler.sim.server``). Each used to build the
``chat.completion`` objects, the ``chat.completion.chunk`` events and their SSE framing by hand,
and the three copies had drifted (one sent no ``role``, one numbered streamed tool calls from 0
in every chunk, each wrote logprobs differently). Here a ``Generation`` becomes a
``chat.completion`` and ``GenerationChunk``s become server-sent events, as OpenAI sends them:
a first event with the ``role``, content deltas, tool calls with a stream-wide ``index``, the
``finish_reason``, ``usage`` as an event of its own when ``stream_options.include_usage`` asks
for it, and ``data: [DONE]``.

The events are bytes, ready to write: the gateway's hot path sends them as they are, and each
event is one JSON encoding of its ``choice`` inside a prefix encoded once per stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from scheduler.backends.base import Generation, GenerationChunk, TokenLogprob, ToolCall, Usage

DONE = b"data: [DONE]\n\n"

# One encoder for every event: ``json.dumps`` with arguments builds a new one per call.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def json_bytes(obj: Any) -> bytes:
    """Compact UTF-8 JSON, as all three servers write it."""
    return _encode(obj).encode()


def sse(obj: Any) -> bytes:
    """One server-sent event carrying ``obj`` as JSON (also SGLang's native ``/generate`` frames)."""
    return b"data: " + _encode(obj).encode() + b"\n\n"


def tool_calls(calls: list[ToolCall], start: int | None = None) -> list[dict[str, Any]]:
    """OpenAI ``tool_calls``; with ``start``, as stream deltas numbered from it (``index``)."""
    out: list[dict[str, Any]] = [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
    if start is not None:
        out = [{"index": start + i, **c} for i, c in enumerate(out)]
    return out


def usage(u: Usage) -> dict[str, Any]:
    """OpenAI ``usage``; prefix-cache hits as ``prompt_tokens_details.cached_tokens`` (SGLang's name)."""
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def logprobs(lps: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI ``logprobs``: each token with its UTF-8 ``bytes`` and its ``top_logprobs``, best first."""
    return {"content": [{"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp.top]}
                        for lp in lps]}


def completion(gen: Generation, *, id: str, model: str, created: int | None = None,
               with_logprobs: bool = False) -> dict[str, Any]:
    """The ``chat.completion`` object of a whole generation. ``content`` is null only beside
    tool calls (an empty answer is ``""``, which clients print); ``logprobs`` only when asked."""
    message: dict[str, Any] = {"role": "assistant", "content": gen.text or (None if gen.tool_calls else "")}
    if gen.tool_calls:
        message["tool_calls"] = tool_calls(gen.tool_calls)
    choice = {"index": 0, "message": message, "logprobs": logprobs(gen.logprobs) if with_logprobs else None,
              "finish_reason": gen.finish_reason}
    return {"id": id, "object": "chat.completion", "created": int(time.time()) if created is None else created,
            "model": model, "choices": [choice], "usage": usage(gen.usage)}


class ChunkEvents:
    """The ``chat.completion.chunk`` events of one streamed answer, as SSE bytes.

    ``first()`` is the ``role`` event; ``event(chunk)`` the event of each ``GenerationChunk`` (and,
    on the chunk that carries ``usage``, the usage event when ``include_usage``); then ``DONE``.
    ``events()`` does all of it for a stream; the gateway calls the parts itself because it sends
    nothing before the first chunk has come (so a dead backend is still an error status)."""

    def __init__(self, id: str, model: str, created: int | None = None, *, with_logprobs: bool = False,
                 include_usage: bool = False) -> None:
        head = _encode({"id": id, "object": "chat.completion.chunk",
                        "created": int(time.time()) if created is None else created, "model": model})
        self._head = "data: " + head[:-1] + ',"choices":['  # each event closes it with its choice
        self.with_logprobs = with_logprobs
        self.include_usage = include_usage
        self._calls = 0  # tool calls sent so far: their ``index`` counts across the stream

    def _choice(self, choice: dict[str, Any]) -> bytes:
        return (self._head + _encode(choice) + "]}\n\n").encode()

    def first(self) -> bytes:
        return self._choice({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})

    def event(self, chunk: GenerationChunk) -> bytes:
        delta: dict[str, Any] = {}
        if chunk.text:
            delta["content"] = chunk.text
        if chunk.tool_calls:
            delta["tool_calls"] = tool_calls(chunk.tool_calls, self._calls)
            self._calls += len(chunk.tool_calls)
        lps = logprobs(chunk.logprobs) if self.with_logprobs and chunk.logprobs else None
        out = self._choice({"index": 0, "delta": delta, "logprobs": lps, "finish_reason": chunk.finish_reason})
        if chunk.usage is not None and self.include_usage:
            out += (self._head + '],"usage":' + _encode(usage(chunk.usage)) + "}\n\n").encode()
        return out

    async def events(self, chunks: AsyncIterator[GenerationChunk]) -> AsyncGenerator[bytes, None]:
        """The whole stream: ``first()``, an event per chunk, ``DONE``. ``chunks`` is closed when
        this ends, also when the reader leaves early (its ``finally`` may abort the request)."""
        try:
            yield self.first()
            async for chunk in chunks:
                yield self.event(chunk)
            yield DONE
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

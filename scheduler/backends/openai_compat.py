"""Any OpenAI-compatible endpoint through the ``openai`` SDK: hosted models (with prices for
cost ledgers), and also SGLang's or the local engine's ``/v1``.

Hosted APIs have no abort endpoint and no KV capacity: ``abort`` cancels our own
in-flight request (closing the connection stops generation on servers that
notice), and ``capacity`` is whatever the caller declares.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from scheduler.backends.base import (
    Backend, BackendError, BackendHTTPError, BackendTimeout, BackendUnavailable, Capacity, FinishReason,
    GenerateRequest, GenerationChunk, Load, StreamInterrupted, TokenLogprob, ToolCallBuffer, Usage,
)


class ModelPrice:
    """US dollars per million input and output tokens."""

    def __init__(self, input_per_mtok: float, output_per_mtok: float, cached_input_per_mtok: float | None = None):
        self.input = input_per_mtok
        self.output = output_per_mtok
        self.cached_input = input_per_mtok if cached_input_per_mtok is None else cached_input_per_mtok

    def cost(self, usage: Usage) -> float:
        fresh = usage.prompt_tokens - usage.cached_tokens
        return (fresh * self.input + usage.cached_tokens * self.cached_input
                + usage.completion_tokens * self.output) / 1e6


class OpenAICompatBackend(Backend):
    def __init__(
        self,
        base_url: str,
        api_key: str = "none",
        *,
        model: str,
        name: str | None = None,
        prices: dict[str, ModelPrice | tuple[float, ...]] | None = None,
        capacity_tokens: int | None = None,
        timeout: float = 120.0,
        max_retries: int = 0,
    ) -> None:
        self.model = model
        self.name = name or f"{base_url}#{model}"
        # {model: ModelPrice} or {model: (input_per_mtok, output_per_mtok[, cached_input_per_mtok])}
        self.prices = {m: p if isinstance(p, ModelPrice) else ModelPrice(*p) for m, p in (prices or {}).items()}
        self._capacity = capacity_tokens
        self._client = AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self._inflight: dict[str, asyncio.Task[Any]] = {}
        self._running = 0

    def cost(self, usage: Usage, model: str | None = None) -> float:
        price = self.prices.get(model or self.model)
        return price.cost(usage) if price else 0.0

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        """The upstream stream runs in its own task feeding a queue, so ``abort`` can cancel
        it without touching the caller's task."""
        queue: asyncio.Queue[GenerationChunk | BaseException | None] = asyncio.Queue()
        producer = asyncio.create_task(self._produce(request, queue))
        self._inflight[request.rid] = producer
        self._running += 1
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._running -= 1
            self._inflight.pop(request.rid, None)
            producer.cancel()

    async def _produce(self, r: GenerateRequest, queue: asyncio.Queue[Any]) -> None:
        streamed = False
        try:
            source = self._chat(r) if r.messages is not None else self._completion(r)
            async for chunk in source:
                streamed = streamed or bool(chunk.text)
                await queue.put(chunk)
            await queue.put(None)
        except asyncio.CancelledError:  # aborted
            await queue.put(GenerationChunk(rid=r.rid, finish_reason="abort", usage=Usage()))
            await queue.put(None)
        except openai.APITimeoutError as exc:
            kind: type[BackendError] = StreamInterrupted if streamed else BackendTimeout
            await queue.put(kind(f"{self.name}: {exc}", backend=self.name))
        except openai.APIConnectionError as exc:
            kind = StreamInterrupted if streamed else BackendUnavailable
            await queue.put(kind(f"{self.name}: {exc}", backend=self.name))
        except openai.APIStatusError as exc:
            await queue.put(BackendHTTPError(f"{self.name}: {exc.message}", status=exc.status_code,
                                             backend=self.name))
        except Exception as exc:
            await queue.put(exc)

    def _sampling(self, r: GenerateRequest) -> dict[str, Any]:
        kw: dict[str, Any] = {"model": r.model or self.model, "max_tokens": r.max_tokens,
                              "temperature": r.temperature, "top_p": r.top_p,
                              "stream_options": {"include_usage": True}}
        if r.stop:
            kw["stop"] = r.stop
        if r.seed is not None:
            kw["seed"] = r.seed
        extra = dict(r.extra_body)
        if r.priority is not None:
            extra["priority"] = r.priority
        if extra:
            kw["extra_body"] = extra
        return kw

    async def _chat(self, r: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        kw = self._sampling(r)
        if r.logprobs:
            kw["logprobs"] = True
            kw["top_logprobs"] = r.top_logprobs
        if r.tools:
            kw["tools"] = r.tools
            kw["tool_choice"] = r.tool_choice if r.tool_choice is not None else "auto"
        calls = ToolCallBuffer()
        finish: FinishReason | None = None
        usage: Any = None
        # the request's messages are OpenAI's message dicts, checked by the gateway or the workflow
        messages = cast("list[ChatCompletionMessageParam]", r.messages)
        async with await self._client.chat.completions.create(messages=messages, stream=True, **kw) as stream:
            async for chunk in stream:
                for choice in chunk.choices:
                    delta = choice.delta
                    for tc in delta.tool_calls or []:
                        fn = tc.function
                        calls.add(tc.index, tc.id, fn.name if fn else None, fn.arguments if fn else None)
                    if choice.finish_reason:
                        finish = choice.finish_reason if choice.finish_reason in (
                            "stop", "length", "tool_calls") else "stop"
                    lps = [TokenLogprob(token=c.token, logprob=c.logprob,
                                        top=[(t.token, t.logprob) for t in c.top_logprobs or []])
                           for c in ((choice.logprobs.content or []) if choice.logprobs else [])]
                    if delta.content or lps:
                        yield GenerationChunk(rid=r.rid, text=delta.content or "", logprobs=lps)
                if chunk.usage is not None:
                    usage = chunk.usage  # the end comes after [DONE]: read to it, the connection is reused
        yield self._final(r.rid, usage, finish, calls)

    async def _completion(self, r: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        kw = self._sampling(r)
        if r.logprobs:
            kw["logprobs"] = max(r.top_logprobs, 1)
        prompt: Any = r.prompt if r.prompt is not None else r.input_ids
        finish: FinishReason | None = None
        usage: Any = None
        async with await self._client.completions.create(prompt=prompt, stream=True, **kw) as stream:
            async for chunk in stream:
                for choice in chunk.choices:
                    if choice.finish_reason:
                        finish = "length" if choice.finish_reason == "length" else "stop"
                    lps = []
                    if choice.logprobs and choice.logprobs.tokens:
                        tops = choice.logprobs.top_logprobs or []
                        # no token_logprobs: no logprobs for any token
                        pairs = zip(choice.logprobs.tokens, choice.logprobs.token_logprobs or [], strict=False)
                        for i, (tok, lp) in enumerate(pairs):
                            top = sorted((tops[i] or {}).items(), key=lambda kv: -kv[1]) if i < len(tops) else []
                            lps.append(TokenLogprob(token=tok, logprob=lp, top=top))
                    if choice.text or lps:
                        yield GenerationChunk(rid=r.rid, text=choice.text, logprobs=lps)
                if chunk.usage is not None:
                    usage = chunk.usage  # read on to [DONE] (see _chat)
        yield self._final(r.rid, usage, finish, ToolCallBuffer())

    @staticmethod
    def _final(rid: str, usage: Any, finish: FinishReason | None, calls: ToolCallBuffer) -> GenerationChunk:
        cached = 0
        if usage is not None and getattr(usage, "prompt_tokens_details", None) is not None:
            cached = usage.prompt_tokens_details.cached_tokens or 0
        return GenerationChunk(
            rid=rid, tool_calls=calls.calls(), finish_reason=calls.finish_reason(finish),
            usage=Usage(prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                        completion_tokens=getattr(usage, "completion_tokens", 0) or 0, cached_tokens=cached))

    async def abort(self, rid: str) -> None:
        task = self._inflight.get(rid)
        if task is not None:
            task.cancel()

    async def capacity(self) -> Capacity:
        if self._capacity is None:
            raise NotImplementedError(f"{self.name}: a hosted API reports no KV capacity; pass capacity_tokens")
        return Capacity(max_total_tokens=self._capacity)

    async def load(self) -> Load:
        return Load(running=self._running)

    async def health(self) -> bool:
        try:
            await self._client.models.list()
            return True
        except openai.OpenAIError:
            return False

    async def close(self) -> None:
        await self._client.close()

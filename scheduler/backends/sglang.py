"""SGLang over its native HTTP API (verified against real SGLang 0.5.23, see tests/backends).

Chat goes to ``/v1/chat/completions`` (streamed, with ``include_usage`` so the final
chunk carries cached tokens; in one response when the caller reads only the whole answer);
raw prompts and token ids go to ``/generate``, whose streamed ``text`` is cumulative and is
turned into deltas here. Every request carries ``rid`` so the scheduler can abort it on the
engine.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from scheduler.backends._http import mapped_errors, raise_for_status, sse_json, stream_post
from scheduler.backends._http1 import Http1Pool
from scheduler.backends.base import (
    Backend, BackendHTTPError, Capacity, FinishReason, GenerateRequest, GenerationChunk, Load, StreamInterrupted,
    TokenLogprob, ToolCallBuffer, Usage,
)

_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort", "tool_calls": "tool_calls"}


def _finish(value: Any) -> FinishReason | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else value
    return _FINISH.get(str(kind), "stop")


def _chat_logprobs(choice: dict[str, Any]) -> list[TokenLogprob]:
    """A chat choice's (or streamed chunk's) ``logprobs.content`` as TokenLogprobs."""
    return [TokenLogprob(token=c["token"], logprob=c["logprob"],
                         top=[(t["token"], t["logprob"]) for t in c.get("top_logprobs") or []])
            for c in ((choice.get("logprobs") or {}).get("content") or [])]


def _chat_usage(usage: dict[str, Any]) -> Usage:
    """OpenAI-format ``usage``, with SGLang's cached prompt tokens."""
    details = usage.get("prompt_tokens_details") or {}
    return Usage(prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=usage.get("completion_tokens", 0),
                 cached_tokens=details.get("cached_tokens") or 0)


def _generate_logprobs(entries: list[Any] | None, tops: list[Any] | None = None) -> list[TokenLogprob]:
    """``[[logprob, token_id, text], ...]`` (+ optional top lists) -> TokenLogprob list."""
    out = []
    for i, entry in enumerate(entries or []):
        if entry is None or entry[0] is None:
            continue
        top = []
        if tops and i < len(tops) and tops[i]:
            top = [(t[2] or "", t[0]) for t in tops[i] if t and t[0] is not None]
        out.append(TokenLogprob(token=entry[2] or "", token_id=entry[1], logprob=entry[0], top=top))
    return out


def ranks_kv(server_info: dict[str, Any]) -> bool:
    """Can calls carry an eviction rank as their ``priority``? With ``--radix-eviction-policy
    priority`` the radix cache evicts the lowest priority first. ``--enable-priority-scheduling``
    reads the same field as queue order, largest first by default, and preempts a running call
    for one ranked 10 higher: ranks (times in seconds) would turn the queue around. It is
    compatible only with ``--schedule-low-priority-values-first`` (oldest first, as FCFS) and
    ``--disable-priority-preemption``. Without priority scheduling,
    ``--abort-on-priority-when-disabled`` would refuse every call that carries a priority."""
    if server_info.get("radix_eviction_policy") != "priority":
        return False
    if not server_info.get("enable_priority_scheduling"):
        return not server_info.get("abort_on_priority_when_disabled")
    return bool(server_info.get("schedule_low_priority_values_first")
                and server_info.get("disable_priority_preemption"))


class SGLangBackend(Backend):
    continues_final_message = True  # verified on SGLang 0.5.23 (tests/backends/test_sglang_real.py)

    def __init__(
        self,
        base_url: str,
        *,
        name: str | None = None,
        model: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 120.0,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = name or self.base_url
        self.model = model or "default"
        self._http = http_client or httpx.AsyncClient(
            base_url=self.base_url, timeout=httpx.Timeout(read_timeout, connect=connect_timeout))
        # generation streams (the gateway's hot path) on the lean HTTP/1.1 pool; httpx for the
        # rest, and for everything when the caller brings a client or the URL is https
        self._pool = Http1Pool(self.base_url, connect_timeout=connect_timeout, read_timeout=read_timeout) \
            if http_client is None and self.base_url.startswith("http://") else None

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        source = self._chat if request.messages is not None else self._generate
        async for chunk in source(request):
            yield chunk

    # ---- chat ------------------------------------------------------------------

    def _chat_body(self, r: GenerateRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": r.model or self.model, "messages": r.messages, "max_tokens": r.max_tokens,
            "temperature": r.temperature, "top_p": r.top_p, "rid": r.rid,
        }
        if r.stream:
            body["stream"], body["stream_options"] = True, {"include_usage": True}
        if r.stop:
            body["stop"] = r.stop
        if r.seed is not None:
            body["seed"] = r.seed
        if r.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = r.top_logprobs
        if r.tools:
            body["tools"] = r.tools
            body["tool_choice"] = r.tool_choice if r.tool_choice is not None else "auto"
        if r.priority is not None:
            body["priority"] = r.priority
        return {**body, **r.extra_body}

    async def _chat(self, r: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        if r.prompt_logprobs:
            raise ValueError("prompt logprobs need a raw prompt: render the chat template and send `prompt`")
        if not r.stream:
            yield await self._chat_whole(r)
            return
        streamed = [False]
        calls = ToolCallBuffer()
        finish: FinishReason | None = None
        final: GenerationChunk | None = None
        async with mapped_errors(self.name, streamed=streamed):
            async with stream_post(self._http, self._pool, "/v1/chat/completions", self._chat_body(r)) as resp:
                await raise_for_status(resp, self.name)
                async for data in sse_json(resp):
                    usage = data.get("usage")
                    for choice in data.get("choices") or []:
                        delta = choice.get("delta") or {}
                        for tc in delta.get("tool_calls") or []:
                            fn = tc.get("function") or {}
                            calls.add(tc.get("index", 0), tc.get("id"), fn.get("name"), fn.get("arguments"))
                        finish = _finish(choice.get("finish_reason")) or finish
                        lps = _chat_logprobs(choice)
                        text = delta.get("content") or ""
                        if text or lps:
                            streamed[0] = True
                            yield GenerationChunk(rid=r.rid, text=text, logprobs=lps)
                    if usage:
                        final = GenerationChunk(rid=r.rid, tool_calls=calls.calls(),
                                                finish_reason=calls.finish_reason(finish), usage=_chat_usage(usage))
                # read on to `[DONE]` before yielding the end: a response read to its end hands
                # its connection back to the pool (closed early, every call paid a new connect)
        if final is not None:
            yield final
            return
        raise StreamInterrupted(f"{self.name}: stream of {r.rid} ended without a final chunk", backend=self.name)

    async def _chat_whole(self, r: GenerateRequest) -> GenerationChunk:
        """A non-streamed chat call, for a caller that reads only the whole answer: one JSON
        response, as one final chunk. Cancelling it closes the connection and the runtime sends
        ``/abort_request``, as for a stream."""
        async with mapped_errors(self.name):
            async with stream_post(self._http, self._pool, "/v1/chat/completions", self._chat_body(r)) as resp:
                await raise_for_status(resp, self.name)
                raw = await resp.aread()
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            message = choice.get("message") or {}
            calls = ToolCallBuffer()
            for i, tc in enumerate(message.get("tool_calls") or []):
                fn = tc.get("function") or {}
                calls.add(tc.get("index", i), tc.get("id"), fn.get("name"), fn.get("arguments"))
            return GenerationChunk(
                rid=r.rid, text=message.get("content") or "", logprobs=_chat_logprobs(choice), tool_calls=calls.calls(),
                finish_reason=calls.finish_reason(_finish(choice.get("finish_reason"))),
                usage=_chat_usage(data.get("usage") or {}))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise BackendHTTPError(f"{self.name}: malformed chat completion: {exc!r}"[:500], status=502,
                                   backend=self.name) from None

    # ---- raw prompt / token ids ------------------------------------------------

    def _generate_body(self, r: GenerateRequest) -> dict[str, Any]:
        sampling: dict[str, Any] = {"max_new_tokens": r.max_tokens, "temperature": r.temperature, "top_p": r.top_p}
        if r.stop:
            sampling["stop"] = r.stop
        if r.seed is not None:
            sampling["sampling_seed"] = r.seed
        body: dict[str, Any] = {"rid": r.rid, "sampling_params": sampling, "stream": True}
        if r.prompt is not None:
            body["text"] = r.prompt
        else:
            body["input_ids"] = r.input_ids
        if r.logprobs or r.prompt_logprobs:
            body["return_logprob"] = True
            body["top_logprobs_num"] = max(r.top_logprobs, r.prompt_top_logprobs)
            body["return_text_in_logprobs"] = True
            body["logprob_start_len"] = 0 if r.prompt_logprobs else -1
        if r.priority is not None:
            body["priority"] = r.priority
        return {**body, **r.extra_body}

    async def _generate(self, r: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        streamed = [False]
        text_so_far = ""
        ids_so_far = 0
        lps_so_far = 0
        final: GenerationChunk | None = None
        async with mapped_errors(self.name, streamed=streamed):
            async with stream_post(self._http, self._pool, "/generate", self._generate_body(r)) as resp:
                await raise_for_status(resp, self.name)
                async for data in sse_json(resp):
                    meta = data.get("meta_info") or {}
                    text = data.get("text") or ""
                    delta, text_so_far = text[len(text_so_far):], text
                    ids = data.get("output_ids") or []
                    new_ids, ids_so_far = ids[ids_so_far:], max(ids_so_far, len(ids))
                    lps: list[TokenLogprob] = []
                    if r.logprobs:
                        entries = meta.get("output_token_logprobs") or []
                        tops = meta.get("output_top_logprobs") or []
                        lps = _generate_logprobs(entries[lps_so_far:], tops[lps_so_far:])
                        lps_so_far = max(lps_so_far, len(entries))
                    finish = _finish(meta.get("finish_reason"))
                    if delta or lps or new_ids:
                        streamed[0] = True
                    if finish is None:
                        if delta or lps or new_ids:  # a token may add no text yet (a partial character)
                            yield GenerationChunk(rid=r.rid, text=delta, token_ids=new_ids, logprobs=lps)
                        continue
                    prompt_lps = None
                    if r.prompt_logprobs:
                        prompt_lps = _generate_logprobs(meta.get("input_token_logprobs"),
                                                        meta.get("input_top_logprobs"))
                    final = GenerationChunk(
                        rid=r.rid, text=delta, token_ids=new_ids, logprobs=lps, finish_reason=finish,
                        prompt_logprobs=prompt_lps,
                        usage=Usage(prompt_tokens=meta.get("prompt_tokens", 0),
                                    completion_tokens=meta.get("completion_tokens", 0),
                                    cached_tokens=meta.get("cached_tokens", 0)))
                    # on to `[DONE]`, so the connection goes back to the pool (see _chat)
        if final is not None:
            yield final
            return
        raise StreamInterrupted(f"{self.name}: stream of {r.rid} ended without a final chunk", backend=self.name)

    # ---- control ---------------------------------------------------------------

    async def abort(self, rid: str) -> None:
        async with mapped_errors(self.name):
            resp = await self._http.post("/abort_request", json={"rid": rid})
            await raise_for_status(resp, self.name)

    async def _get_json(self, path: str) -> Any:
        async with mapped_errors(self.name):
            resp = await self._get(path)
            await raise_for_status(resp, self.name)
            return resp.json()

    async def capacity(self) -> Capacity:
        info = await self._get_json("/get_server_info")
        return Capacity(max_total_tokens=info["max_total_num_tokens"],
                        max_context_tokens=info.get("max_req_input_len") or info.get("context_length"),
                        ranks_kv=ranks_kv(info))

    async def load(self) -> Load:
        try:
            data = await self._get_json("/v1/loads")
            entry = data["loads"][0]
        except Exception as exc:  # older releases: /get_load
            if getattr(exc, "status", None) != 404:
                raise
            data = await self._get_json("/get_load")
            entry = data[0] if isinstance(data, list) else data
        return Load(running=entry.get("num_running_reqs", 0),
                    queued=entry.get("num_waiting_reqs", entry.get("num_queue_reqs", 0)),
                    used_tokens=entry.get("num_used_tokens", 0),
                    total_tokens=entry.get("max_total_num_tokens"))

    async def health(self) -> bool:
        try:
            async with mapped_errors(self.name):
                return (await self._get("/health")).status_code == 200
        except Exception:
            return False

    async def _get(self, path: str) -> httpx.Response:
        """A GET, sent once more on a new connection when the kept-alive one it went out on was
        closed under it. The server closes an idle connection after its keep-alive timeout (5 s
        in uvicorn, which SGLang runs on); a request that leaves as it does gets "Server
        disconnected without sending a response", and a stalled event loop makes that likely.
        Without the second try one such race marked a live backend down until the next check
        and failed the calls placed meanwhile. A GET is safe to repeat."""
        try:
            return await self._http.get(path)
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
            return await self._http.get(path)

    async def model_info(self) -> dict[str, Any]:
        return await self._get_json("/get_model_info")

    async def flush_cache(self) -> None:
        async with mapped_errors(self.name):
            await raise_for_status(await self._http.post("/flush_cache"), self.name)

    async def metrics(self) -> dict[str, float]:
        """``sglang:*`` samples by name, summed over label sets (engine ranks, priorities).

        Histogram buckets are left out (a sum over ``le`` means nothing); their
        ``_sum`` and ``_count`` stay.
        """
        async with mapped_errors(self.name):
            resp = await self._http.get("/metrics")
            await raise_for_status(resp, self.name)
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(resp.text):
            for s in family.samples:
                if s.name.startswith("sglang:") and "le" not in s.labels and "quantile" not in s.labels:
                    out[s.name] = out.get(s.name, 0.0) + s.value
        return out

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
        await self._http.aclose()


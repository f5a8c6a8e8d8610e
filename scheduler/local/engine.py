"""``LocalEngine``: the ``Backend`` that runs the real model in this process.

Forward passes run one at a time on a single worker thread (torch on 2 CPU
cores gains nothing from running two at once), so concurrent requests
interleave token by token and the event loop never blocks. No batching: this is
the embedded default and the reference for correctness, not a GPU server.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from collections.abc import AsyncIterator
from typing import Any

import torch

from scheduler.backends.base import (
    Backend, Capacity, FinishReason, GenerateRequest, GenerationChunk, Load, TokenLogprob, Usage,
)
from scheduler.local.model import LoadedModel, load_model
from scheduler.local.prefix_cache import KV, PrefixKVCache
from scheduler.local.grammar import Constraint, GrammarCompiler
from scheduler.local.tool_calls import ToolCallParser, normalize_messages, with_tools


@dataclass
class _Active:
    rid: str
    context: int
    aborted: bool = False


@dataclass
class _Step:
    logits: torch.Tensor  # [vocab] for the next token
    kv: KV = field(default_factory=list)


class LocalEngine(Backend):
    continues_final_message = True  # renders the chat template with the last assistant turn open

    def __init__(self, loaded: LoadedModel | None = None, *, cache_tokens: int = 16384, name: str = "local") -> None:
        self.loaded = loaded or load_model()
        self.name = name
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.cache = PrefixKVCache(cache_tokens)
        self.grammars = GrammarCompiler(self.tokenizer, int(self.model.config.vocab_size))
        self.cache_tokens = cache_tokens
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-engine")
        self._active: dict[str, _Active] = {}
        self.stats = {"prompt_tokens": 0, "cached_tokens": 0, "generation_tokens": 0, "requests": 0}

    # ---- tokens --------------------------------------------------------------------

    def encode(self, request: GenerateRequest) -> list[int]:
        return self._prompt(request)[0]

    def _prompt(self, request: GenerateRequest) -> tuple[list[int], bool]:
        """Prompt token ids, and whether the output is to be parsed for tool calls."""
        if request.input_ids is not None:
            return list(request.input_ids), False
        if request.messages is None:
            return self.tokenizer(request.prompt, add_special_tokens=False)["input_ids"], False
        messages = normalize_messages(request.messages)
        if request.extra_body.get("continue_final_message") and messages and messages[-1].get("role") == "assistant" \
                and not request.tools:
            # as SGLang does: the last assistant turn is left open (no end of turn, no new
            # header) and the model goes on writing it (the staircase pipeline's ``prefix``)
            text = self.tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"], False
        tools = bool(request.tools) and request.tool_choice != "none"
        if tools:
            messages = with_tools(messages, request.tools or [])
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"], tools

    # ---- model (worker thread) -----------------------------------------------------

    @torch.inference_mode()
    def _forward(self, tokens: list[int], past: KV | None) -> tuple[torch.Tensor, KV]:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=past) if past else DynamicCache()
        out = self.model(input_ids=torch.tensor([tokens]), cache=cache, use_cache=True)
        # SmolLM2 has full-attention layers only: each holds keys and values
        kv: KV = [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[union-attr,misc]
        return out.logits[0].float(), kv

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ---- generation ----------------------------------------------------------------

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        ids, parse_calls = self._prompt(request)
        limit = self.loaded.max_context_tokens
        if not ids or len(ids) + request.max_tokens > limit:
            raise ValueError(f"prompt of {len(ids)} tokens + max_tokens {request.max_tokens} exceeds the "
                             f"context of {limit} tokens")
        # compiling a grammar (and, the first time, the tokenizer's view of it, ~2 s) runs on the
        # engine's thread, not the event loop's
        constraint = await self._run(self.grammars.constraint, request.tool_choice, request.tools) \
            if parse_calls else None
        active = _Active(request.rid, len(ids))
        self._active[request.rid] = active
        try:
            chunks = self._generate(request, ids, active, constraint)
            if parse_calls:
                chunks = self._parse_tool_calls(chunks, ToolCallParser())
            async for chunk in chunks:
                yield chunk
        finally:
            self._active.pop(request.rid, None)

    async def _generate(self, r: GenerateRequest, ids: list[int], active: _Active,
                        constraint: Constraint | None = None) -> AsyncIterator[GenerationChunk]:
        # Prompt logprobs need logits at every prompt position: those requests prefill in full.
        cached, past = (0, None) if r.prompt_logprobs else self.cache.match(ids, limit=len(ids) - 1)
        logits, kv = await self._run(self._forward, ids[cached:], past)
        prompt_lps = self._prompt_logprobs(ids, logits, r.prompt_top_logprobs) if r.prompt_logprobs else None
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(ids)
        self.stats["cached_tokens"] += cached
        gen = torch.Generator().manual_seed(r.seed if r.seed is not None else torch.seed() % (2**63))
        out_ids: list[int] = []
        text = ""
        finish: FinishReason | None = None
        next_logits = logits[-1]
        eos = set(self._eos_ids())
        while finish is None:
            if active.aborted:
                finish = "abort"
                break
            token, lp = self._choose(next_logits, r, gen, constraint.mask() if constraint else None)
            forced = constraint.consume(token) if constraint else []
            forced = forced[: max(0, r.max_tokens - len(out_ids) - 1)]
            new = [token, *forced]
            out_ids.extend(new)
            active.context += len(new)
            self.stats["generation_tokens"] += len(new)
            full = self.tokenizer.decode(out_ids, skip_special_tokens=True)
            stop_at = self._stop_index(full, r.stop)
            if eos.intersection(new) or (constraint is not None and constraint.done):
                finish = "stop"
            elif stop_at is not None:
                full, finish = full[:stop_at], "stop"
            elif len(out_ids) >= r.max_tokens:
                finish = "length"
            delta = full[len(text):] if not full.endswith("\ufffd") or finish else ""
            text += delta
            lps = [lp] if r.logprobs else []
            if finish is None:
                if delta or r.logprobs:
                    yield GenerationChunk(rid=r.rid, text=delta, token_ids=new, logprobs=lps)
                logits, kv = await self._run(self._forward, new, kv)
                next_logits = logits[-1]
            else:
                last = GenerationChunk(rid=r.rid, text=delta, token_ids=new, logprobs=lps)
                break
        fed = (ids + out_ids)[: kv[0][0].shape[2]] if kv else ids
        self.cache.insert(fed, kv)
        usage = Usage(prompt_tokens=len(ids), completion_tokens=len(out_ids), cached_tokens=cached)
        if finish == "abort":
            yield GenerationChunk(rid=r.rid, finish_reason="abort", usage=usage, prompt_logprobs=prompt_lps)
            return
        yield last.model_copy(update={"finish_reason": finish, "usage": usage, "prompt_logprobs": prompt_lps})

    @staticmethod
    async def _parse_tool_calls(chunks: AsyncIterator[GenerationChunk],
                                parser: ToolCallParser) -> AsyncIterator[GenerationChunk]:
        async for chunk in chunks:
            text = parser.feed(chunk.text)
            if chunk.finish_reason is None:
                if text or chunk.logprobs:
                    yield chunk.model_copy(update={"text": text})
                continue
            rest, calls = parser.finish()
            finish = chunk.finish_reason
            yield chunk.model_copy(update={
                "text": text + rest, "tool_calls": calls,
                "finish_reason": "tool_calls" if calls and finish == "stop" else finish})

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        return [i for i in ids if i is not None] + [self.tokenizer.eos_token_id]

    @staticmethod
    def _stop_index(text: str, stops: list[str] | None) -> int | None:
        hits = [text.find(s) for s in stops or [] if s and s in text]
        return min(hits) if hits else None

    def _token_lp(self, logprobs: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
        top: list[tuple[str, float]] = []
        if top_n:
            values, indices = torch.topk(logprobs, top_n)
            top = [(self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, indices, strict=True)]
        return TokenLogprob(token=self.tokenizer.decode([token]), token_id=token, logprob=float(logprobs[token]),
                            top=top)

    def _choose(self, logits: torch.Tensor, r: GenerateRequest, gen: torch.Generator,
                allowed: torch.Tensor | None = None) -> tuple[int, TokenLogprob]:
        """Sample the next token. ``allowed`` (a grammar's mask) removes the others before
        sampling; the logprob reported is the model's own, unconstrained."""
        logprobs = torch.log_softmax(logits, dim=-1)
        if allowed is not None and bool(allowed.any()):
            logits = logits.masked_fill(~allowed[: logits.shape[0]], float("-inf"))
        if r.temperature == 0:
            token = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits / r.temperature, dim=-1)
            if r.top_p < 1:
                sorted_p, order = torch.sort(probs, descending=True)
                keep = torch.cumsum(sorted_p, 0) - sorted_p < r.top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            token = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
        return token, self._token_lp(logprobs, token, r.top_logprobs)

    def _prompt_logprobs(self, ids: list[int], logits: torch.Tensor, top_n: int) -> list[TokenLogprob]:
        """One entry per prompt token after the first: how likely the model found it."""
        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        return [self._token_lp(logprobs[i], ids[i + 1], top_n) for i in range(len(ids) - 1)]

    # ---- control -------------------------------------------------------------------

    async def abort(self, rid: str) -> None:
        active = self._active.get(rid)
        if active is not None:
            active.aborted = True

    def active_rids(self) -> list[str]:
        return list(self._active)

    async def capacity(self) -> Capacity:
        return Capacity(max_total_tokens=self.cache_tokens, max_context_tokens=self.loaded.max_context_tokens)

    async def load(self) -> Load:
        in_use = self.cache.size + sum(a.context for a in self._active.values())
        return Load(running=len(self._active), queued=0, used_tokens=in_use, total_tokens=self.cache_tokens)

    async def health(self) -> bool:
        return True

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

"""``SimEngine``: a discrete-event model of one SGLang engine (scheduler + KV pool).

What it models, after SGLang's scheduler: a waiting queue (FCFS, or priority first with
``enable_priority_scheduling``; larger value = more urgent, SGLang's default); prefill batches
take precedence over decode and are bounded by ``chunked_prefill_size`` tokens (a long prompt
is prefilled in chunks over several forwards); admission needs the uncached prompt plus a
reserve for future output (``new_token_ratio`` x remaining ``max_new_tokens`` of every running
request, decaying from 0.7 to 0.1 as SGLang does) to fit in free + evictable KV; the KV pool is
shared by the radix cache and the running requests' own tokens; when a decode step lacks room
the LRU cache is evicted first, then running requests are retracted (fewest output tokens first,
lowest priority first) back to the queue, to be re-prefilled later. Finished (and aborted)
requests leave their computed tokens in the radix cache, ranked by their ``priority`` with
``radix_eviction_policy="priority"`` (SGLang's flag of that name; see ``radix.py``).

Why decode runs as "macro steps": a cluster-hour is millions of decode steps. While nothing
changes, ``k`` steps are one event whose duration is the closed-form sum of growing-context
step times; any arrival or abort cuts the macro step at the first step boundary after it, so
timing stays exact. Per-token streaming (the HTTP server) uses ``max_macro_steps=1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, Literal

from scheduler.backends.base import ToolCall
from scheduler.sim.clock import Clock, Timer
from scheduler.sim.cost import CostModel
from scheduler.sim.radix import PrefixMatch, RadixCache
from scheduler.sim.script import Plan, PseudoScript, Script

SimFinish = Literal["stop", "length", "tool_calls", "abort"]

INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = (INIT_NEW_TOKEN_RATIO - MIN_NEW_TOKEN_RATIO) / 600  # per decode step


@dataclass(eq=False)
class SimRequest:
    """One generation and, once done, its per-request report."""

    rid: str
    input_ids: list[int]
    max_new_tokens: int = 256
    priority: int = 0
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    prompt_text: str | None = None  # the prompt as text, when it came as text or messages (scripts read it)
    on_tokens: Callable[[SimRequest], None] | None = None
    on_finish: Callable[[SimRequest], None] | None = None
    # --- report ---
    arrival: float = math.nan
    first_token_time: float | None = None
    finish_time: float | None = None
    cached_tokens: int = 0
    generated: int = 0
    finish_reason: SimFinish | None = None
    retractions: int = 0
    prefilled_tokens: int = 0
    plan: Plan | None = None
    output_ids: list[int] = field(default_factory=list)
    # --- engine state ---
    _seq: int = 0
    _match: PrefixMatch | None = None  # locked cache prefix
    _kv: int = 0  # tokens with KV (prefix in cache + own)
    _own: int = 0  # KV tokens allocated to this request outside the cache
    _admitted: bool = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def completion_tokens(self) -> int:
        return self.generated

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival

    @property
    def target_tokens(self) -> int:
        assert self.plan is not None
        return len(self.plan.pieces)

    @property
    def text(self) -> str:
        assert self.plan is not None
        return "".join(self.plan.pieces[: self.generated])

    @property
    def tool_calls(self) -> list[ToolCall]:
        done = self.plan is not None and self.finish_reason == "tool_calls"
        return list(self.plan.tool_calls) if done and self.plan else []

    def full_ids(self) -> list[int]:
        """Prompt plus generated tokens: what a (re-)prefill has to cover (not a copy when
        nothing was generated yet: prompts of agents are long)."""
        return self.input_ids + self.output_ids[: self.generated] if self.generated else self.input_ids


@dataclass
class EngineConfig:
    cost: CostModel
    kv_capacity_tokens: int | None = None  # default: the preset's
    max_running_requests: int | None = None
    chunked_prefill_size: int | None = None
    enable_priority_scheduling: bool = False
    radix_eviction_policy: str = "lru"  # or "priority": SGLang's --radix-eviction-policy
    max_macro_steps: int = 256


@dataclass
class EngineStats:
    requests_finished: int = 0
    requests_aborted: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generation_tokens: int = 0
    prefill_tokens: int = 0
    retractions: int = 0
    busy_time: float = 0.0


@dataclass
class _Decode:
    batch: list[SimRequest]
    start: float
    steps: int
    context: int


class SimEngine:
    """One simulated SGLang engine on a ``Clock``."""

    def __init__(self, clock: Clock, config: EngineConfig, script: Script | None = None, name: str = "sim") -> None:
        self.clock = clock
        self.cost = config.cost
        self.capacity = config.kv_capacity_tokens or self.cost.kv_capacity_tokens
        self.max_running = config.max_running_requests or self.cost.max_running_requests
        self.chunk_size = config.chunked_prefill_size or self.cost.chunked_prefill_size
        self.priority_scheduling = config.enable_priority_scheduling
        self.radix_eviction_policy = config.radix_eviction_policy
        self.max_macro_steps = max(1, config.max_macro_steps)
        self.script: Script = script or PseudoScript()
        self.name = name
        self.cache = RadixCache(self.capacity, eviction=config.radix_eviction_policy)
        self.stats = EngineStats()
        self.waiting: list[SimRequest] = []
        self.running: list[SimRequest] = []
        self._chunked: SimRequest | None = None
        self._own_total = 0
        self._seq = 0
        self._ratio = INIT_NEW_TOKEN_RATIO
        self._timer: Timer | None = None
        self._step_end = 0.0
        self._decode: _Decode | None = None
        self._kick_pending = False
        self._by_rid: dict[str, SimRequest] = {}
        self._pins: dict[str, PrefixMatch] = {}

    # ---- public API ---------------------------------------------------------------------

    @property
    def used_tokens(self) -> int:
        """KV tokens in use, as SGLang's ``num_used_tokens``: running requests' own tokens plus
        the cache tokens they hold (unreferenced cache counts as free)."""
        return self._own_total + (self.cache.size - self.cache.evictable_size)

    @property
    def num_running(self) -> int:
        return len(self.running) + (1 if self._chunked is not None else 0)

    def is_live(self, rid: str) -> bool:
        return rid in self._by_rid

    def live_rids(self) -> list[str]:
        return list(self._by_rid)

    def submit(self, req: SimRequest) -> None:
        if req.rid in self._by_rid:
            raise ValueError(f"duplicate rid {req.rid}")
        req.arrival = self.clock.now()
        self._seq += 1
        req._seq = self._seq
        req.plan = self.script.plan(req)
        req.output_ids = req.plan.token_ids
        self._by_rid[req.rid] = req
        if req.prompt_tokens + 1 > min(self.capacity, self.cost.context_length):
            self._finish(req, "abort")  # SGLang rejects it too: it could never be scheduled
            return
        self.waiting.append(req)
        self._interrupt()

    def abort(self, rid: str) -> bool:
        """Abort a waiting or running request; its computed tokens stay in the cache."""
        req = self._by_rid.get(rid)
        if req is None:
            return False
        if req in self.waiting:
            self.waiting.remove(req)
        elif req in self.running:
            self.running.remove(req)
        elif req is self._chunked:
            self._chunked = None
        self._finish(req, "abort")
        self._interrupt()
        return True

    def pin(self, key: str, tokens: list[int]) -> int:
        """Lock the cached prefix of ``tokens`` so eviction cannot take it (a stand-in for
        Continuum's KV pin; SGLang has no such endpoint). Returns the tokens pinned."""
        self.unpin(key)
        match = self.cache.match_prefix(tokens)
        if match.length:
            self.cache.lock(match.node)
            self._pins[key] = match
        return match.length

    def unpin(self, key: str) -> None:
        match = self._pins.pop(key, None)
        if match is not None:
            self.cache.unlock(match.node)
            if self.waiting:
                self._interrupt()

    @property
    def pinned_tokens(self) -> int:
        return sum(m.length for m in self._pins.values())

    def flush_cache(self) -> bool:
        """Empty the radix cache; like SGLang, only when nothing is running or waiting."""
        if self.running or self.waiting or self._chunked is not None:
            return False
        self.cache.reset()
        return True

    # ---- scheduling loop ----------------------------------------------------------------

    def _interrupt(self) -> None:
        """Something changed: start a step if idle, or cut a macro decode step short."""
        now = self.clock.now()
        if self._timer is None:
            if not self._kick_pending:
                self._kick_pending = True
                self.clock.call_at(now, self._kick)
            return
        d = self._decode
        if d is None or d.steps <= 1:
            return
        steps = self._steps_done_by(d, now)
        if steps < d.steps:
            self._timer.cancel()
            for r in d.batch:
                if r._admitted:
                    r._own -= d.steps - steps
                    self._own_total -= d.steps - steps
            d.steps = steps
            self._step_end = d.start + self.cost.decode_steps_time(len(d.batch), d.context, steps)
            self._timer = self.clock.call_at(self._step_end, self._end_decode)

    def _steps_done_by(self, d: _Decode, t: float) -> int:
        """Smallest step count whose end is at or after ``t`` (at least 1)."""
        c = self.cost
        a = c.decode_step_time(len(d.batch), d.context)
        b = len(d.batch) * c.decode_per_context_token_s
        elapsed = t - d.start
        if b == 0:
            steps = math.ceil(elapsed / a - 1e-12)
        else:  # b/2 k^2 + (a - b/2) k - elapsed >= 0
            p = a - b / 2
            steps = math.ceil((-p + math.sqrt(p * p + 2 * b * elapsed)) / b - 1e-12)
        while steps > 1 and c.decode_steps_time(len(d.batch), d.context, steps - 1) >= elapsed:
            steps -= 1
        return max(1, min(d.steps, steps))

    def _kick(self) -> None:
        self._kick_pending = False
        if self._timer is None:
            self._next_step()

    def _next_step(self) -> None:
        self._timer = None
        self._decode = None
        if self._start_prefill():
            return
        if self.running:
            self._start_decode()

    def _order_waiting(self) -> list[SimRequest]:
        if self.priority_scheduling:
            return sorted(self.waiting, key=lambda r: (-r.priority, r._seq))
        return sorted(self.waiting, key=lambda r: r._seq)

    def _reserve(self, req: SimRequest) -> int:
        return math.ceil(self._ratio * max(0, req.max_new_tokens - req.generated))

    def _start_prefill(self) -> bool:
        if not self.waiting and self._chunked is None:
            return False
        budget = self.chunk_size
        chunks: list[tuple[SimRequest, int, int]] = []  # (req, new tokens now, prefix before)
        if self._chunked is not None:
            req = self._chunked
            take = min(budget, len(req.full_ids()) - req._kv)
            chunks.append((req, take, req._kv))
            budget -= take
        pending = sum(take for _, take, _ in chunks) + sum(self._reserve(r) for r in self.running)
        for req in self._order_waiting():
            if budget <= 0 or len(self.running) + len(chunks) >= self.max_running:
                break
            ids = req.full_ids()
            match = self.cache.match_prefix(ids)
            length = min(match.length, len(ids) - 1)  # the last token is always recomputed
            if length < match.length:
                match = self.cache.match_prefix(ids[:length])
            new = len(ids) - length
            self.cache.lock(match.node)
            available = self.capacity - self._own_total - (self.cache.size - self.cache.evictable_size) - pending
            if new + self._reserve(req) > available:
                self.cache.unlock(match.node)
                break  # FCFS/priority order: do not let later requests jump the queue
            pending += new + self._reserve(req)
            self.waiting.remove(req)
            req._match, req._kv, req._admitted = match, length, True
            if req.retractions == 0:
                req.cached_tokens = length
            take = min(budget, new)
            chunks.append((req, take, length))
            budget -= take
        if not chunks:
            return False
        for req, take, _ in chunks:
            self._alloc(req, take)
        self._chunked = None
        duration = self.cost.prefill_time((take, prefix) for _, take, prefix in chunks)
        self._step_end = self.clock.now() + duration
        self.stats.busy_time += duration
        self._timer = self.clock.call_at(self._step_end, lambda: self._end_prefill(chunks))
        return True

    def _end_prefill(self, chunks: list[tuple[SimRequest, int, int]]) -> None:
        now = self.clock.now()
        for req, take, _ in chunks:
            if req.finish_reason is not None:
                continue  # aborted meanwhile
            req._kv += take
            req.prefilled_tokens += take
            self.stats.prefill_tokens += take
            if req._kv < len(req.full_ids()):
                self._chunked = req
                continue
            req.generated += 1  # the prefill forward samples the next token
            if req.first_token_time is None:
                req.first_token_time = now
            self._emit(req)
            if req.generated >= req.target_tokens:
                self._finish(req, self._reason(req))
            else:
                self.running.append(req)
        self._next_step()

    def _start_decode(self) -> None:
        steps = min(self.max_macro_steps, min(r.target_tokens - r.generated for r in self.running))
        while True:
            batch = len(self.running)
            free = self.capacity - self._own_total - self.cache.size
            if free < batch * steps:
                free += self.cache.evict(batch * steps - free)
            if free >= batch:
                steps = min(steps, free // batch)
                break
            self._retract_one()
            if not self.running:
                self._next_step()
                return
        batch_reqs = list(self.running)
        for r in batch_reqs:
            self._alloc_own(r, steps)
        context = sum(r._kv for r in batch_reqs)
        d = _Decode(batch=batch_reqs, start=self.clock.now(), steps=steps, context=context)
        self._decode = d
        duration = self.cost.decode_steps_time(len(batch_reqs), context, steps)
        self._step_end = d.start + duration
        self._timer = self.clock.call_at(self._step_end, self._end_decode)

    def _end_decode(self) -> None:
        d = self._decode
        assert d is not None
        self.stats.busy_time += self.clock.now() - d.start
        self._ratio = max(MIN_NEW_TOKEN_RATIO, self._ratio - NEW_TOKEN_RATIO_DECAY * d.steps)
        for req in d.batch:
            if req.finish_reason is not None or not req._admitted:
                continue  # aborted or retracted meanwhile
            req.generated += d.steps
            req._kv += d.steps
            self._emit(req)
            if req.generated >= req.target_tokens:
                self.running.remove(req)
                self._finish(req, self._reason(req))
        self._next_step()

    def _retract_one(self) -> None:
        """Put one running request back in the queue, freeing its own KV (SGLang's retract)."""
        key = (lambda r: (r.priority, r.generated, -r.prompt_tokens)) if self.priority_scheduling \
            else (lambda r: (r.generated, -r.prompt_tokens))
        req = min(self.running, key=key)
        self.running.remove(req)
        self._release(req, keep_in_cache=False)
        req.retractions += 1
        self.stats.retractions += 1
        self.waiting.append(req)
        self._ratio = INIT_NEW_TOKEN_RATIO

    # ---- KV accounting --------------------------------------------------------------------

    def _alloc(self, req: SimRequest, n: int) -> None:
        free = self.capacity - self._own_total - self.cache.size
        if free < n:
            self.cache.evict(n - free)
        self._alloc_own(req, n)

    def _alloc_own(self, req: SimRequest, n: int) -> None:
        req._own += n
        self._own_total += n

    def _release(self, req: SimRequest, keep_in_cache: bool) -> None:
        if not req._admitted:
            return
        self._own_total -= req._own
        req._own = 0
        match = req._match
        assert match is not None
        if keep_in_cache:  # before unlocking: the locked prefix is still there to start from
            prompt, kv, start = len(req.input_ids), req._kv, match.length
            tail = req.input_ids[start:kv] + req.output_ids[: max(0, kv - prompt)]
            self.cache.insert(tail, match, priority=req.priority)
        self.cache.unlock(match.node)
        req._match, req._kv, req._admitted = None, 0, False

    # ---- completion ---------------------------------------------------------------------

    def _reason(self, req: SimRequest) -> SimFinish:
        assert req.plan is not None
        return req.plan.finish_reason

    def _emit(self, req: SimRequest) -> None:
        if req.on_tokens is not None:
            req.on_tokens(req)

    def _finish(self, req: SimRequest, reason: SimFinish) -> None:
        self._release(req, keep_in_cache=True)
        req.finish_reason = reason
        req.finish_time = self.clock.now()
        self._by_rid.pop(req.rid, None)
        s = self.stats
        s.prompt_tokens += req.prompt_tokens
        s.cached_tokens += req.cached_tokens
        s.generation_tokens += req.generated
        if reason == "abort":
            s.requests_aborted += 1
        else:
            s.requests_finished += 1
        if req.on_finish is not None:
            req.on_finish(req)

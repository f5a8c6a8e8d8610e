"""The runtime carries the program policy's KV ranks to a backend that evicts by priority.

A recording backend (a unit test of the runtime's translation: what the proof on engines is,
see tests/sim/test_cluster.py and tests/backends/test_sglang_retain.py) reports
``ranks_kv``; every call then carries its dispatch time as a wall-clock ``priority``, and a
program kept through a tool call while another waits gets one one-token call over its last
context (its messages and the answer's text, continued), ranked at the end of the tool's
expected time. A backend that does not rank gets neither."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import pytest

from scheduler.backends.base import Backend, Capacity, GenerateRequest, GenerationChunk, Load, ToolCall, Usage
from scheduler.runtime import ProgramRuntime


class Recorder(Backend):
    def __init__(self, ranks: bool, capacity: int) -> None:
        self.name, self.ranks, self.cap = "rec", ranks, capacity
        self.calls: list[GenerateRequest] = []

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        self.calls.append(request)
        tool = request.max_tokens > 1 and request.tools is not None
        yield GenerationChunk(rid=request.rid, text="let me look")
        yield GenerationChunk(rid=request.rid, finish_reason="tool_calls" if tool else "stop",
                              tool_calls=[ToolCall(id="c1", name="ls", arguments="{}")] if tool else [],
                              usage=Usage(prompt_tokens=6000, completion_tokens=3))

    async def abort(self, rid: str) -> None: ...

    async def capacity(self) -> Capacity:
        return Capacity(max_total_tokens=self.cap, ranks_kv=self.ranks)

    async def load(self) -> Load:
        return Load()

    async def health(self) -> bool:
        return True


def chat(text: str) -> GenerateRequest:
    return GenerateRequest(messages=[{"role": "user", "content": text * 6000}], max_tokens=50,
                           tools=[{"type": "function", "function": {"name": "ls", "parameters": {}}}])


@pytest.mark.parametrize("ranks", [True, False])
async def test_ranks_and_retain_calls_reach_a_ranking_backend_only(ranks: bool) -> None:
    backend = Recorder(ranks, capacity=8_000)
    runtime = ProgramRuntime({"rec": backend}, prefill_s_per_token=1e-2, observe_interval_s=60)
    for _ in range(20):
        runtime.sched.tools.record("ls", 30.0)
    await runtime.start()
    waiting = None
    try:
        before = int(time.time())
        [c async for c in runtime.stream("a", "t", chat("a"))]
        first = backend.calls[0]
        # b arrives while a's tool runs and does not fit beside a's 6,000 kept tokens: demand
        waiting = asyncio.ensure_future(_drain(runtime.stream("b", "t", chat("b"))))
        for _ in range(40):  # the next tick (1 s) finds a kept while b waits: one Retain
            await asyncio.sleep(0.05)
            if len(backend.calls) > 1:
                break
        assert runtime.sched.programs["a"].kept and not waiting.done()
        if not ranks:
            assert first.priority is None and len(backend.calls) == 1 and runtime.sched.counters["retains"] == 0
            return
        assert before <= first.priority <= int(time.time())
        retain = backend.calls[-1]
        assert len(backend.calls) == 2 and retain.max_tokens == 1 and retain.rid != first.rid
        # its messages and the answer's text, continued (SGLang renders the prompt with its
        # generation header, then the text: what the call left cached); the tool call is not resent
        assert retain.messages[:-1] == first.messages and retain.tools == first.tools
        assert retain.messages[-1] == {"role": "assistant", "content": "let me look"}
        assert retain.extra_body == {"continue_final_message": True}
        assert int(time.time()) + 25 <= retain.priority <= int(time.time()) + 31  # ~30 s of "ls" ahead
        await asyncio.sleep(1.2)  # later ticks: it is not renewed
        assert len(backend.calls) == 2 and runtime.stats.retains_sent == 1
    finally:
        if waiting is not None:
            waiting.cancel()
        await runtime.close()


async def _drain(stream: AsyncIterator[GenerationChunk]) -> None:
    async for _ in stream:
        pass


@pytest.mark.slow
@pytest.mark.parametrize("eviction", ["priority", "lru"])
async def test_a_kept_program_s_kv_survives_a_flood_through_the_runtime(eviction: str) -> None:
    """End to end on the simulator's SGLang-compatible server in its own process: program a's
    call ends, its tool starts (a hint) while w waits for memory, so a is kept and, on a server
    that evicts by priority, retained; then newer calls (each ranked by its dispatch time, as
    other programs' calls are) overflow the KV pool. a's next call finds its context cached on
    the priority server, and recomputes it on the LRU one (where nothing is ranked)."""
    import random

    import httpx

    from scheduler.backends.sglang import SGLangBackend
    from tests.servers import SimServerProcess

    sim = SimServerProcess("--speed", "1000", "--capacity-tokens", "12000", "--radix-eviction-policy", eviction).start()
    backend = SGLangBackend(sim.url)
    runtime = ProgramRuntime({"sim": backend}, prefill_s_per_token=1e-2, observe_interval_s=60)
    for _ in range(20):
        runtime.sched.tools.record("ls", 30.0)
    rng = random.Random(3)
    a_ctx = [rng.randrange(1, 30000) for _ in range(4000)]
    waiting = None
    try:
        await runtime.start()
        assert runtime.sched.backends["sim"].ranks_kv is (eviction == "priority")
        first = [c async for c in runtime.stream("a", "t", GenerateRequest(input_ids=a_ctx, max_tokens=8))]
        runtime.tool_started("a", "t", "ls")
        w = GenerateRequest(input_ids=[rng.randrange(1, 30000) for _ in range(9000)], max_tokens=8)
        waiting = asyncio.ensure_future(_drain(runtime.stream("w", "t", w)))  # does not fit beside a: waits
        await asyncio.sleep(1.5)  # a tick: a is kept while w waits, so it is retained (where ranks count)
        assert runtime.sched.programs["a"].kept and not waiting.done()
        assert runtime.stats.retains_sent == (1 if eviction == "priority" else 0)
        async with httpx.AsyncClient(base_url=sim.url) as direct:  # 15,000 tokens of newer calls
            for _ in range(5):
                body = {"input_ids": [rng.randrange(1, 30000) for _ in range(3000)], "priority": int(time.time()),
                        "sampling_params": {"max_new_tokens": 1}}
                assert (await direct.post("/generate", json=body)).status_code == 200
        runtime.tool_ended("a", "t")
        output = [t for c in first for t in c.token_ids]
        assert output and len(output) == first[-1].usage.completion_tokens
        again = GenerateRequest(input_ids=a_ctx + output + [7, 7, 7], max_tokens=4)
        last = [c async for c in runtime.stream("a", "t", again)][-1]
        if eviction == "priority":
            # its prompt and its answer, but for the answer's last token (never computed)
            assert last.usage.cached_tokens >= 4000 + len(output) - 1
        else:
            assert last.usage.cached_tokens < 100
    finally:
        if waiting is not None:
            waiting.cancel()
        await runtime.close()
        await backend.close()
        sim.kill()

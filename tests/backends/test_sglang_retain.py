"""The program policy's Retain lever on real SGLang 0.5.23 (tier `sglang`).

A second real server runs with ``--radix-eviction-policy priority`` (and, since serve.sh enables
priority scheduling, ``--schedule-low-priority-values-first --disable-priority-preemption``, the
only queue settings under which a rank cannot turn the queue around) and a KV pool of 4,096
tokens. Two contexts of 1,000 tokens are cached with the same rank; one gets the one-token Retain call ranked ahead; then
newer calls, ranked by their dispatch time, overflow the KV pool. The retained context is still
fully cached, the other is evicted: SGLang's eviction honours the ranks. On a server with the same
pool and the default eviction (LRU) the same sequence evicts both. The backend reports the lever
(``Capacity.ranks_kv``) on the first server and not on the second."""

from __future__ import annotations

import random
import time
from typing import Iterator

import pytest

from scheduler.backends import GenerateRequest
from scheduler.backends.sglang import SGLangBackend
from scheduler.runtime import ProgramRuntime
from tests.backends.conftest import sglang_server

pytestmark = pytest.mark.sglang
# Prefill on this CPU runs at ~55 tokens/s, so what the test costs is the tokens it takes to fill
# a pool: both servers get a pool of 4,096 tokens (serve.sh's default is 16,384; the later flag
# wins), filled with 1,000-token calls.
CONTEXT = 1000
POOL = ["--max-total-tokens", "4096"]
FLAGS = [*POOL, "--radix-eviction-policy", "priority", "--schedule-low-priority-values-first",
         "--disable-priority-preemption"]


@pytest.fixture(scope="module")
def ranking_url(pytestconfig: pytest.Config) -> Iterator[str]:
    with sglang_server(pytestconfig, *FLAGS) as url:
        yield url


@pytest.fixture(scope="module")
def lru_url(pytestconfig: pytest.Config) -> Iterator[str]:
    """The same pool with SGLang's default eviction (LRU)."""
    with sglang_server(pytestconfig, *POOL) as url:
        yield url


def ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 40000) for _ in range(n)]


async def flood_test(backend: SGLangBackend, capacity: int, seed: int) -> tuple[int, int]:
    """Cache two contexts at one rank, retain one, overflow the pool with newer calls; what is
    left of each (cached tokens of a call over it)."""
    rng = random.Random(seed)
    kept, released = ids(rng, CONTEXT), ids(rng, CONTEXT)
    now = int(time.time())

    async def call(tokens: list[int], rank: int) -> int:
        g = await backend.generate(GenerateRequest(input_ids=tokens, max_tokens=1, priority=rank))
        return g.usage.cached_tokens

    await call(kept, now)
    await call(released, now)
    assert await call(kept, now + 600) >= CONTEXT - 10  # the Retain: a one-token call ranked ahead
    flood = 0
    while flood < capacity:  # newer calls, each ranked by its dispatch time
        await call(ids(rng, CONTEXT), int(time.time()))
        flood += CONTEXT
    return await call(kept, int(time.time())), await call(released, int(time.time()))


async def test_a_retained_context_outlives_newer_calls_and_an_unretained_one_does_not(ranking_url, lru_url):
    ranking = SGLangBackend(ranking_url, read_timeout=300)
    default = SGLangBackend(lru_url, read_timeout=300)
    try:
        cap = await ranking.capacity()
        assert cap.ranks_kv and not (await default.capacity()).ranks_kv
        kept, released = await flood_test(ranking, cap.max_total_tokens, seed=7)
        assert cap.max_total_tokens <= 4096 + 64  # the flag took (serve.sh's 16384 came first)
        assert (await default.capacity()).max_total_tokens <= 4096 + 64
        assert kept >= CONTEXT - 10 and released < 100  # the lowest rank went first; the retained stayed
        # a chat call's Retain, as the runtime builds it: the messages and the answer's text,
        # continued, are exactly what the call left cached (all but the last token is a hit)
        runtime = ProgramRuntime({"r": ranking})
        chat = GenerateRequest(messages=[{"role": "system", "content": "You are careful. " * 150},
                                         {"role": "user", "content": "Name three rivers of Europe."}], max_tokens=24)
        call = await ranking.generate(chat)
        runtime._remember("p", chat, call.text, call.token_ids)
        again = await ranking.generate(runtime._last_context["p"].model_copy(update={"priority": int(time.time())}))
        covered = call.usage.prompt_tokens + call.usage.completion_tokens
        assert again.usage.prompt_tokens >= covered - 2 and again.usage.cached_tokens >= covered - 3
        # the same with LRU eviction: both are gone, the retained one too
        kept, released = await flood_test(default, (await default.capacity()).max_total_tokens, seed=8)
        assert kept < 100 and released < 100
    finally:
        await ranking.close()
        await default.close()

"""The local engine with the real SmolLM2-135M-Instruct on CPU."""

from __future__ import annotations

import asyncio

import pytest
import torch

from scheduler.backends import GenerateRequest
from scheduler.local import LocalEngine, PrefixKVCache, load_model

pytestmark = pytest.mark.slow

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def loaded():
    return load_model()


@pytest.fixture
async def engine(loaded):
    e = LocalEngine(loaded, cache_tokens=4096)
    yield e
    await e.close()


async def test_real_answer_greedy_and_deterministic(engine):
    a = await engine.generate(GenerateRequest(messages=FRANCE, max_tokens=16))
    assert "Paris" in a.text and a.finish_reason == "stop"
    engine.cache.clear()
    b = await engine.generate(GenerateRequest(messages=FRANCE, max_tokens=16))
    assert b.text == a.text and b.usage.cached_tokens == 0


async def test_stream_deltas_and_logprobs_are_real(engine):
    chunks = [c async for c in engine.stream(GenerateRequest(prompt="One, two, three, four,", max_tokens=8,
                                                             logprobs=True, top_logprobs=5))]
    whole = await engine.generate(GenerateRequest(prompt="One, two, three, four,", max_tokens=8))
    assert "".join(c.text for c in chunks) == whole.text and chunks[-1].finish_reason == "length"
    lps = [lp for c in chunks for lp in c.logprobs]
    assert len(lps) == 8 and chunks[-1].usage.completion_tokens == 8
    for lp in lps:
        assert lp.logprob < 0 and len(lp.top) == 5
        assert lp.logprob == pytest.approx(max(v for _, v in lp.top))  # greedy picks the most likely token
    # The probabilities are a real distribution: the top 5 of the first step sum to at most 1.
    assert sum(torch.tensor([v for _, v in lps[0].top]).exp()) <= 1.0 + 1e-5


async def test_prompt_logprobs(engine):
    gen = await engine.generate(GenerateRequest(prompt="The capital of France is Paris", max_tokens=1,
                                                prompt_logprobs=True, prompt_top_logprobs=2))
    lps = gen.prompt_logprobs
    assert lps is not None and len(lps) == gen.usage.prompt_tokens - 1
    assert all(lp.logprob <= 0 and len(lp.top) == 2 for lp in lps)
    surprising = await engine.generate(GenerateRequest(prompt="The capital of France is Banana", max_tokens=1,
                                                       prompt_logprobs=True))
    assert surprising.prompt_logprobs[-1].logprob < lps[-1].logprob  # "Paris" is likelier than "Banana"


async def test_prefix_cache_hits_and_matches_uncached_output(engine):
    system = {"role": "system", "content": "You answer questions about European geography briefly. " * 8}
    italy = [system, {"role": "user", "content": "What is the capital of Italy?"}]
    first = await engine.generate(GenerateRequest(messages=[system, *FRANCE], max_tokens=12))
    second = await engine.generate(GenerateRequest(messages=italy, max_tokens=12))
    a, b = (engine.encode(GenerateRequest(messages=m)) for m in ([system, *FRANCE], italy))
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert shared > 70 and second.usage.cached_tokens == shared  # every shared token came from the cache
    engine.cache.clear()
    uncached = await engine.generate(GenerateRequest(
        messages=[system, {"role": "user", "content": "What is the capital of Italy?"}], max_tokens=12))
    assert uncached.usage.cached_tokens == 0 and uncached.text == second.text
    again = await engine.generate(GenerateRequest(messages=[system, *FRANCE], max_tokens=12))
    assert again.text == first.text and again.usage.cached_tokens == shared


async def test_concurrent_requests_equal_sequential(engine):
    prompts = [f"Write the number {n} in words:" for n in (7, 12, 40)]
    sequential = [(await engine.generate(GenerateRequest(prompt=p, max_tokens=6))).text for p in prompts]
    engine.cache.clear()
    concurrent = await asyncio.gather(*(engine.generate(GenerateRequest(prompt=p, max_tokens=6)) for p in prompts * 2))
    assert [g.text for g in concurrent] == sequential * 2


async def test_abort_stops_a_long_generation(engine):
    req = GenerateRequest(prompt="Count from one to one thousand:", max_tokens=500)
    chunks = []
    async for c in engine.stream(req):
        chunks.append(c)
        if len(chunks) == 3:
            load = await engine.load()
            assert load.running == 1 and load.used_tokens > 0
            await engine.abort(req.rid)
    assert chunks[-1].finish_reason == "abort" and chunks[-1].usage.completion_tokens <= 5
    assert (await engine.load()).running == 0


async def test_seeded_sampling_and_stop_strings(engine):
    req = dict(prompt="Once upon a time", max_tokens=12, temperature=0.9, seed=7)
    a = await engine.generate(GenerateRequest(**req))
    b = await engine.generate(GenerateRequest(**req))
    assert a.text == b.text
    stopped = await engine.generate(GenerateRequest(prompt="One, two, three, four,", max_tokens=20, stop=[","]))
    assert "," not in stopped.text and stopped.finish_reason == "stop"


def test_lru_eviction_under_budget():
    cache = PrefixKVCache(budget_tokens=10)

    def kv(n: int):
        return [(torch.zeros(1, 1, n, 2), torch.zeros(1, 1, n, 2))]

    cache.insert([1, 2, 3, 4], kv(4))
    cache.insert([5, 6, 7, 8], kv(4))
    assert cache.match([1, 2, 3, 9], limit=10)[0] == 3  # touches the first entry
    cache.insert([9, 9, 9, 9], kv(4))  # over budget: the least recently used ([5..8]) goes
    assert cache.size == 8 and cache.match([5, 6, 7, 8], limit=10)[0] == 0
    assert cache.match([1, 2, 3, 4, 5], limit=2)[0] == 2  # never more than the caller allows
    cache.insert([1, 2, 3, 4, 5, 6], kv(6))  # supersedes its prefix [1..4]
    assert len(cache) == 2 and cache.size == 10

"""The SGLang and OpenAI-compatible backends against real SGLang (tier `sglang`)."""

from __future__ import annotations

import asyncio
import json

import pytest

from scheduler.backends import GenerateRequest, Load
from scheduler.backends.openai_compat import OpenAICompatBackend
from scheduler.backends.sglang import SGLangBackend

pytestmark = pytest.mark.sglang
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture
async def backend(sglang_url):
    b = SGLangBackend(sglang_url, read_timeout=120)
    yield b
    await b.close()


async def test_chat_stream_usage_and_cached_tokens(backend):
    long_ctx = [{"role": "system", "content": "You are a terse geography assistant. " * 20}, *QUESTION]
    chunks = [c async for c in backend.stream(GenerateRequest(messages=long_ctx, max_tokens=8, logprobs=True,
                                                               top_logprobs=2))]
    first = chunks[-1]
    text = "".join(c.text for c in chunks)
    assert "Paris" in text
    assert first.finish_reason in ("stop", "length") and first.usage.prompt_tokens > 100
    lps = [lp for c in chunks for lp in c.logprobs]
    assert lps and all(lp.logprob <= 0 for lp in lps) and len(lps[0].top) == 2
    again = await backend.generate(GenerateRequest(messages=long_ctx, max_tokens=8))
    assert again.text == text  # greedy
    assert again.usage.cached_tokens >= first.usage.prompt_tokens - 8  # the whole prefix came from cache


async def test_generate_stream_deltas_and_prompt_logprobs(backend):
    prompt = "The quick brown fox jumps over the lazy"
    chunks = [c async for c in backend.stream(GenerateRequest(prompt=prompt, max_tokens=6, logprobs=True,
                                                               prompt_logprobs=True))]
    final = chunks[-1]
    whole = await backend.generate(GenerateRequest(prompt=prompt, max_tokens=6))
    assert "".join(c.text for c in chunks) == whole.text and len(chunks) > 1
    assert final.usage.completion_tokens == 6 and final.finish_reason == "length"
    gen_lps = [lp for c in chunks for lp in c.logprobs]
    assert len(gen_lps) == 6 and all(lp.token_id is not None for lp in gen_lps)
    assert final.prompt_logprobs is not None
    # The first prompt token has no logprob; every later one has a real (negative) value.
    assert len(final.prompt_logprobs) == final.usage.prompt_tokens - 1
    assert all(lp.logprob <= 0 for lp in final.prompt_logprobs)


async def test_chat_in_one_response_equals_the_stream(backend):
    """``stream=False`` (the gateway's non-streamed calls) fetches the answer as one JSON
    response: the same greedy text, logprobs, usage and tool calls as the stream gives."""
    req = GenerateRequest(messages=QUESTION, max_tokens=8, logprobs=True, top_logprobs=2)
    streamed = [c async for c in backend.stream(req.model_copy(update={"rid": "s-" + req.rid}))]
    whole = [c async for c in backend.stream(req.model_copy(update={"rid": "w-" + req.rid, "stream": False}))]
    assert len(whole) == 1 and whole[0].finish_reason == streamed[-1].finish_reason
    assert whole[0].text == "".join(c.text for c in streamed) and "Paris" in whole[0].text
    assert [lp.token for lp in whole[0].logprobs] == [lp.token for c in streamed for lp in c.logprobs]
    assert len(whole[0].logprobs[0].top) == 2
    assert whole[0].usage.prompt_tokens == streamed[-1].usage.prompt_tokens
    assert whole[0].usage.completion_tokens == streamed[-1].usage.completion_tokens
    assert whole[0].usage.cached_tokens > 0  # the same prompt again
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    call = GenerateRequest(messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=tools,
                           tool_choice="required", max_tokens=40, stream=False)
    [gen] = [c async for c in backend.stream(call)]
    assert gen.finish_reason == "tool_calls" and gen.tool_calls[0].name == "get_weather"
    assert isinstance(json.loads(gen.tool_calls[0].arguments), dict)


async def test_continue_final_message_goes_on_from_an_open_assistant_turn(backend):
    """``continue_final_message`` (the staircase's ``prefix`` continuation): SGLang renders the
    last assistant turn without its end, so the model writes on from it instead of starting a new
    answer; without the flag the same messages get a new turn."""
    messages = [*QUESTION[:1], {"role": "assistant", "content": "The capital of France is"}]
    on = await backend.generate(GenerateRequest(messages=messages, max_tokens=8,
                                                extra_body={"continue_final_message": True}))
    off = await backend.generate(GenerateRequest(messages=messages, max_tokens=8))
    assert "Paris" in on.text and not on.text.lstrip().startswith("The capital"), on.text
    assert on.usage.prompt_tokens < off.usage.prompt_tokens, (on.usage, off.usage)  # no end of turn, no new header
    assert on.text != off.text


async def running_load(backend: SGLangBackend) -> Load:
    """``/v1/loads`` once it shows a request running. SGLang 0.5.23 publishes that snapshot at a
    prefill, before the new request joins the running batch (``running=0``, its prompt's 7 tokens
    used), and then only every 15 decode steps (``--load-snapshot-publish-interval``): measured,
    the first snapshot with ``running=1`` comes with the 16th token. On a loaded 2-core machine 15
    steps can take longer than the 4 s this test used to poll for, which is why it failed there
    (it read ``running=0, used_tokens=7``). So poll by count, not for a fixed time."""
    for _ in range(600):
        load = await backend.load()
        if load.running >= 1:
            return load
        await asyncio.sleep(0.1)
    raise AssertionError(f"no running request in /v1/loads: {load}")


async def test_abort_stops_a_long_generation(backend):
    req = GenerateRequest(prompt="Count from one to one thousand:", max_tokens=2000, priority=1)
    got: list[str] = []

    async def consume():
        async for c in backend.stream(req):
            got.append(c.text)
            if c.finish_reason:
                return c

    task = asyncio.create_task(consume())
    while len(got) < 3:
        await asyncio.sleep(0.05)
    load = await running_load(backend)
    cap = await backend.capacity()
    assert load.running == 1 and load.total_tokens == cap.max_total_tokens and load.used_tokens > 0
    await backend.abort(req.rid)
    last = await task  # a stream that stalls ends in the backend's read timeout
    # Stopped by the abort, long before its 2,000 tokens (over a minute of decoding here).
    assert last.finish_reason == "abort" and last.usage.completion_tokens < req.max_tokens


async def test_tool_call_capacity_info_and_metrics(backend):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}, "required": ["city"]}}}]
    gen = await backend.generate(GenerateRequest(
        messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=tools,
        tool_choice="required", max_tokens=40))
    assert gen.finish_reason == "tool_calls" and gen.tool_calls[0].name == "get_weather"
    assert isinstance(json.loads(gen.tool_calls[0].arguments), dict)
    # The KV pool is sized from free memory at start, capped by --max-total-tokens 16384.
    cap = await backend.capacity()
    assert 1000 < cap.max_total_tokens <= 16384 and cap.max_context_tokens == 8186
    assert await backend.health()
    assert (await backend.model_info())["served_model_name"] == "SmolLM2-135M-Instruct"
    metrics = await backend.metrics()
    assert "sglang:num_running_reqs" in metrics and metrics["sglang:max_total_num_tokens"] == cap.max_total_tokens
    assert metrics["sglang:num_requests_total"] >= 1


async def test_openai_compatible_backend_on_sglang_v1(sglang_url):
    b = OpenAICompatBackend(f"{sglang_url}/v1", model="SmolLM2-135M-Instruct")
    try:
        gen = await b.generate(GenerateRequest(messages=QUESTION, max_tokens=8, logprobs=True, top_logprobs=1))
        assert "Paris" in gen.text and gen.usage.prompt_tokens > 0 and gen.logprobs
        again = await b.generate(GenerateRequest(messages=QUESTION, max_tokens=8))
        assert again.usage.cached_tokens > 0
        comp = await b.generate(GenerateRequest(prompt="One, two, three,", max_tokens=5))
        assert comp.text and comp.usage.completion_tokens == 5
        req = GenerateRequest(prompt="Count from one to one thousand:", max_tokens=2000)
        chunks = []
        async for c in b.stream(req):
            chunks.append(c)
            if len(chunks) == 3:
                await b.abort(req.rid)
        assert chunks[-1].finish_reason == "abort"
        assert await b.health()
    finally:
        await b.close()

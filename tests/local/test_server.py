"""The SGLang and OpenAI-compatible clients end to end against the local engine's
SGLang-compatible server (real model, real loopback HTTP)."""

from __future__ import annotations


import httpx
import pytest
from openai import AsyncOpenAI

from scheduler.backends import GenerateRequest
from scheduler.backends.openai_compat import OpenAICompatBackend
from scheduler.backends.sglang import SGLangBackend
from scheduler.local import LocalEngine, load_model
from scheduler.local.server import create_server
from tests.servers import serve_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded():
    return load_model()


@pytest.fixture
async def url(loaded):
    engine = LocalEngine(loaded, cache_tokens=4096)
    try:
        async with serve_app(create_server(engine)) as base:
            yield base
    finally:
        await engine.close()


async def test_generate_stream_is_cumulative_like_sglang(url):
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        texts = []
        body = {"text": "One, two, three,", "stream": True, "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
        async with c.stream("POST", "/generate", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    texts.append(httpx.Response(200, content=line[6:]).json()["text"])
        assert len(texts) > 1 and all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))


async def test_sglang_client_against_local_server(url):
    b = SGLangBackend(url)
    try:
        q = [{"role": "user", "content": "What is the capital of France?"}]
        first = await b.generate(GenerateRequest(messages=q, max_tokens=12, logprobs=True, top_logprobs=2))
        assert "Paris" in first.text and first.logprobs and first.usage.prompt_tokens > 0
        again = await b.generate(GenerateRequest(messages=q, max_tokens=12))
        assert again.text == first.text and again.usage.cached_tokens == again.usage.prompt_tokens - 1
        raw = await b.generate(GenerateRequest(prompt="The capital of France is", max_tokens=4, logprobs=True,
                                               prompt_logprobs=True))
        assert len(raw.prompt_logprobs) == raw.usage.prompt_tokens - 1 and len(raw.logprobs) == 4
        req = GenerateRequest(prompt="Count from one to one thousand:", max_tokens=400)
        chunks = []
        async for c in b.stream(req):
            chunks.append(c)
            if len(chunks) == 3:
                await b.abort(req.rid)
        assert chunks[-1].finish_reason == "abort"
        assert (await b.capacity()).max_total_tokens == 4096
        assert (await b.load()).running == 0 and await b.health()
        metrics = await b.metrics()
        assert metrics["sglang:num_requests_total"] == 4 and metrics["sglang:cached_tokens_total"] > 0
    finally:
        await b.close()


async def test_openai_sdk_backend_against_local_server(url):
    b = OpenAICompatBackend(f"{url}/v1", model="SmolLM2-135M-Instruct", capacity_tokens=4096)
    try:
        gen = await b.generate(GenerateRequest(messages=[{"role": "user", "content": "Say hello."}], max_tokens=8))
        assert gen.text and gen.usage.completion_tokens > 0 and gen.finish_reason in ("stop", "length")
        assert await b.health()
    finally:
        await b.close()


async def test_openai_client_stream_helper_against_local_server(url):
    """The chat stream (``scheduler.backends.openai_wire``) as the ``openai`` client's own
    stream helper assembles it: the role, the text, a logprob per token, usage."""
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none")
    async with client.chat.completions.stream(
            model="m", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, logprobs=True,
            top_logprobs=2, stream_options={"include_usage": True}) as stream:
        async for _ in stream:
            pass
        final = stream.current_completion_snapshot  # get_final_completion refuses a `length` finish
    choice = final.choices[0]
    assert choice.message.role == "assistant" and choice.message.content and final.usage is not None
    assert choice.logprobs is not None and len(choice.logprobs.content or []) == final.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode()) for t in choice.logprobs.content or [])

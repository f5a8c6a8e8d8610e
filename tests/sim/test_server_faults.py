"""The simulator server's scripted faults (``--stall-after-tokens``, ``--fail-after-tokens``) and
``--chunked-script``, seen through the project's SGLang client: what pipeline tests build on."""

from __future__ import annotations

import asyncio
import time

import pytest

from scheduler.backends.base import GenerateRequest, StreamInterrupted
from scheduler.backends.sglang import SGLangBackend
from scheduler.sim.script import ChunkedScript, TextScript
from scheduler.sim.server import Faults
from tests.sim.test_server import sim_server

REPLY = " one two six ten red big cat dog pen sun"  # one token a word


@pytest.mark.parametrize("chat", [True, False])
async def test_a_scripted_stall_pauses_the_stream_and_the_engine_aborts_a_client_that_leaves(chat: bool):
    async with sim_server(speed=50, script=TextScript(REPLY), faults=Faults(stall_after_tokens=4,
                                                                             stall_seconds=30)) as client:
        backend = SGLangBackend(str(client.base_url))
        req = GenerateRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=64) if chat else \
            GenerateRequest(prompt="hi", max_tokens=64)
        text = ""
        stream = backend.stream(req)
        try:
            async with asyncio.timeout(1):
                async for chunk in stream:
                    text += chunk.text
        except TimeoutError:
            pass
        finally:
            await stream.aclose()
        assert text == " one two six ten"  # four tokens, then nothing
        await backend.abort(req.rid)
        for _ in range(50):
            loads = (await client.get("/v1/loads")).json()["loads"][0]
            if loads["num_running_reqs"] == 0:
                break
            await asyncio.sleep(0.05)
        assert loads["num_running_reqs"] == 0
        await backend.close()


async def test_a_short_stall_resumes_and_a_scripted_failure_breaks_the_stream():
    async with sim_server(speed=50, script=TextScript(REPLY), faults=Faults(stall_after_tokens=2,
                                                                             stall_seconds=0.5)) as client:
        backend = SGLangBackend(str(client.base_url))
        t0 = time.monotonic()
        gen = await backend.generate(GenerateRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=64))
        assert gen.text == REPLY and time.monotonic() - t0 >= 0.5
        await backend.close()
    async with sim_server(speed=50, script=TextScript(REPLY), faults=Faults(fail_after_tokens=3)) as client:
        backend = SGLangBackend(str(client.base_url))
        text = ""
        with pytest.raises(StreamInterrupted):
            async for chunk in backend.stream(GenerateRequest(messages=[{"role": "user", "content": "x"}])):
                text += chunk.text
        assert text == " one two six"
        await backend.close()


async def test_chunked_script_numbers_its_chunks():
    async with sim_server(speed=50, script=ChunkedScript(6, 3)) as client:
        backend = SGLangBackend(str(client.base_url))
        gen = await backend.generate(GenerateRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=64))
        assert gen.text.startswith(" [0]") and " [1]" in gen.text and " [2]" in gen.text
        assert gen.usage.completion_tokens == 18
        await backend.close()

"""The backend pool against real server processes that are killed, frozen and restarted.

Backends are the simulator's SGLang-compatible server, each in its own process, so
SIGKILL cuts a live TCP stream and SIGSTOP makes a real hang (the kernel still
accepts the connection; nothing answers). Replies depend on the prompt and seed,
not on the server, so a request retried elsewhere must produce the same text.
"""

from __future__ import annotations

import asyncio
import signal
from typing import AsyncIterator

import pytest

from scheduler.backends import BackendHTTPError, GenerateRequest, StreamInterrupted
from scheduler.backends.pool import BackendPool, BreakerState, CircuitBreaker, NoBackendAvailable
from scheduler.backends.sglang import SGLangBackend
from tests.backends.test_failures import misbehaving_app, serve
from tests.servers import SimServerProcess


def long_chat(max_tokens: int = 120) -> GenerateRequest:
    return GenerateRequest(messages=[{"role": "user", "content": "write a long story about failover"}],
                           max_tokens=max_tokens, extra_body={"ignore_eos": True})


# ---- the breaker's logic (a unit test: time is a fake clock) --------------------------------


def test_breaker_opens_half_opens_and_backs_off():
    now = [0.0]
    b = CircuitBreaker(failure_threshold=3, cooldown_s=2.0, max_cooldown_s=5.0, clock=lambda: now[0])
    for _ in range(2):
        b.record_failure()
    assert b.state is BreakerState.CLOSED and b.allow()
    b.record_failure()
    assert b.state is BreakerState.OPEN and not b.allow() and not b.available()
    now[0] = 2.0
    assert b.available() and b.allow()          # half-open: one trial ...
    assert b.state is BreakerState.HALF_OPEN and not b.allow()  # ... and only one
    b.record_failure()                          # the trial failed: open again, cool-down doubled
    assert b.state is BreakerState.OPEN and b.current_cooldown_s == 4.0
    now[0] = 5.9
    assert not b.allow()
    now[0] = 6.0
    assert b.allow()
    b.record_failure()
    assert b.current_cooldown_s == 5.0          # capped
    now[0] = 11.0
    assert b.allow()
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.failures == 0 and b.allow() and b.allow()
    b.trip()                                    # a failed health check opens at once
    assert b.state is BreakerState.OPEN and b.current_cooldown_s == 2.0


def test_candidates_put_preferred_first_and_skip_open():
    class Named(SGLangBackend):
        def __init__(self, name: str) -> None:
            super().__init__("http://127.0.0.1:9", name=name)

    pool = BackendPool([Named("a"), Named("b"), Named("c")], failure_threshold=1)
    assert pool.candidates(prefer=["c"])[0] == "c"
    assert sorted(pool.candidates()) == ["a", "b", "c"]
    pool.members["b"].breaker.record_failure()
    assert "b" not in pool.candidates(prefer=["b"])
    pool.members["c"].healthy = False
    assert pool.candidates() == ["a"]
    with pytest.raises(ValueError):
        pool.candidates(prefer=["nope"])
    with pytest.raises(ValueError):
        BackendPool([Named("a"), Named("a")])


# ---- real processes --------------------------------------------------------------------------


@pytest.fixture
async def fast() -> AsyncIterator[SimServerProcess]:
    proc = SimServerProcess("--speed", "4").start()
    yield proc
    proc.kill()


async def test_kill_mid_stream_then_failover_breaker_and_recovery(fast: SimServerProcess):
    slow = SimServerProcess("--speed", "0.05").start()  # ~150 ms a token: killed while streaming
    try:
        pool = BackendPool([SGLangBackend(slow.url, name="slow"), SGLangBackend(fast.url, name="fast")],
                           failure_threshold=2, cooldown_s=0.5, health_interval_s=0.2, health_timeout_s=1.0)
        await pool.start()
        reference = await SGLangBackend(fast.url).generate(long_chat())
        assert reference.usage.completion_tokens == 120

        # 1. stream(): the caller has seen output, so the cut surfaces as StreamInterrupted
        got: list[str] = []
        with pytest.raises(StreamInterrupted):
            async for chunk in pool.stream(long_chat(), prefer=["slow"]):
                got.append(chunk.text)
                if len(got) == 3:
                    slow.kill()
        assert len(got) == 3 and "".join(got) == reference.text[:len("".join(got))]

        # 2. generate(): the dead backend refuses, the request goes to the other one
        gen = await pool.generate(long_chat(), prefer=["slow"])
        assert gen.text == reference.text and gen.finish_reason == "length"

        # 3. the health checker finds it dead: its breaker is open, traffic avoids it untried
        for _ in range(50):
            if not pool.members["slow"].healthy:
                break
            await asyncio.sleep(0.05)
        assert not pool.members["slow"].healthy and pool.members["slow"].breaker.state is BreakerState.OPEN
        before = pool.members["slow"].requests
        gen = await pool.generate(long_chat(), prefer=["slow"])
        assert gen.text == reference.text and pool.members["slow"].requests == before
        assert await pool.health()

        # 4. back on the same port: the health checker closes the breaker, traffic returns
        slow = SimServerProcess("--speed", "4", port=slow.port).start()
        for _ in range(50):
            if pool.members["slow"].healthy:
                break
            await asyncio.sleep(0.05)
        assert pool.members["slow"].breaker.state is BreakerState.CLOSED
        before = pool.members["slow"].requests
        gen = await pool.generate(long_chat(), prefer=["slow"])
        assert gen.text == reference.text and pool.members["slow"].requests == before + 1
        await pool.close()
    finally:
        slow.kill()


async def test_generate_repeats_a_request_cut_mid_stream_elsewhere(fast: SimServerProcess):
    slow = SimServerProcess("--speed", "0.05").start()
    try:
        pool = BackendPool([SGLangBackend(slow.url, name="slow"), SGLangBackend(fast.url, name="fast")])
        reference = await SGLangBackend(fast.url).generate(long_chat())
        task = asyncio.create_task(pool.generate(long_chat(), prefer=["slow"]))
        probe = SGLangBackend(slow.url)
        for _ in range(200):  # wait until the slow server is decoding our request
            if (await probe.load()).running:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        slow.kill()
        gen = await asyncio.wait_for(task, 30)
        # the partial output from the killed server was dropped; the whole reply came from the other
        assert gen.text == reference.text and gen.usage.completion_tokens == 120
        assert pool.members["slow"].failures == 1 and pool.members["fast"].requests == 1
        # a caller that cannot repeat the step says so, and sees the cut instead
        slow2 = SimServerProcess("--speed", "0.05").start()
        pool2 = BackendPool([SGLangBackend(slow2.url, name="slow"), SGLangBackend(fast.url, name="fast")])
        task = asyncio.create_task(pool2.generate(long_chat(), prefer=["slow"], retry_interrupted=False))
        await asyncio.sleep(1.0)
        slow2.kill()
        with pytest.raises(StreamInterrupted):
            await asyncio.wait_for(task, 30)
        await pool.close()
        await pool2.close()
    finally:
        slow.kill()


async def test_frozen_backend_times_out_and_fails_over(fast: SimServerProcess):
    frozen = SimServerProcess().start()
    try:
        frozen.signal(signal.SIGSTOP)  # accepts TCP in the kernel, never answers
        pool = BackendPool([SGLangBackend(frozen.url, name="frozen", read_timeout=0.5, connect_timeout=0.5),
                            SGLangBackend(fast.url, name="fast")], health_timeout_s=0.5)
        t0 = asyncio.get_running_loop().time()
        gen = await pool.generate(long_chat(20), prefer=["frozen"])
        assert gen.usage.completion_tokens == 20
        assert asyncio.get_running_loop().time() - t0 < 5
        assert "Timeout" in (pool.members["frozen"].last_error or "")
        assert await pool.check_health() == {"frozen": False, "fast": True}
        await pool.close()
    finally:
        frozen.kill()


async def test_5xx_fails_over_4xx_does_not(fast: SimServerProcess):
    small = SimServerProcess("--capacity-tokens", "2048").start()
    try:
        async with serve(misbehaving_app()) as broken:
            pool = BackendPool([SGLangBackend(broken, name="broken"), SGLangBackend(small.url, name="small")],
                               failure_threshold=5)
            gen = await pool.generate(GenerateRequest(prompt="500", max_tokens=8), prefer=["broken"])
            assert gen.finish_reason in ("stop", "length") and pool.members["broken"].failures == 1
            # the request's own fault: no retry elsewhere, and the breaker does not count it
            with pytest.raises(BackendHTTPError) as err:
                await pool.generate(GenerateRequest(input_ids=[5] * 3000, max_tokens=8), prefer=["small"])
            assert err.value.status == 400
            assert pool.members["small"].breaker.failures == 0 and pool.members["broken"].requests == 1
            # every backend down: one clear error naming each failure
            small.kill()
            with pytest.raises(NoBackendAvailable) as none:
                await pool.generate(GenerateRequest(prompt="500", max_tokens=8))
            assert "broken" in str(none.value) and "small" in str(none.value)
            await pool.close()
    finally:
        small.kill()

"""The Redis bus on a real Redis: a process receives only the channels it has readers for, and a
reader that has entered its subscription misses nothing published after that."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as redis

from orchestrator.events import redis_bus
from orchestrator.events.redis_bus import PREFIX, RedisBus


@pytest.fixture
async def two(redis_url):
    a, b = RedisBus(redis_url), RedisBus(redis_url)
    await a.start()
    await b.start()
    yield a, b
    await a.close()
    await b.close()


async def numsub(url: str, channel: str) -> int:
    client = redis.from_url(url)
    try:
        return dict(await client.pubsub_numsub(PREFIX + channel))[(PREFIX + channel).encode()]
    finally:
        await client.aclose()


async def test_a_replica_receives_only_the_channels_it_reads(two, redis_url):
    a, b = two
    run = f"run:{uuid.uuid4().hex}"
    for i in range(20):  # nobody on b reads these: Redis does not send them to b at all
        await a.publish(f"run:{uuid.uuid4().hex}", {"i": i})
    async with a.subscribe("probe") as probe:  # a's own publishes arrive in order: the 20 went out
        await a.publish("probe", {})
        assert await probe.get(timeout=5) == {}
    assert b.received == 0
    async with b.subscribe(run) as sub:
        assert await numsub(redis_url, run) == 1
        await a.publish(run, {"n": 1})
        assert await sub.get(timeout=5) == {"n": 1}
        assert not sub.lagged
    assert b.received == 1
    for _ in range(50):  # the UNSUBSCRIBE goes out from b's membership task
        if await numsub(redis_url, run) == 0:
            break
        await asyncio.sleep(0.05)
    assert await numsub(redis_url, run) == 0


async def test_a_reader_misses_nothing_published_once_it_has_entered(two):
    a, b = two
    for i in range(30):  # enter, publish at once from the other replica: it must arrive
        channel = f"run:{uuid.uuid4().hex}"
        async with b.subscribe(channel) as sub:
            await a.publish(channel, {"i": i})
            assert await sub.get(timeout=5) == {"i": i}, i
    # two readers of one channel on one replica, one leaving while the other stays
    channel = f"run:{uuid.uuid4().hex}"
    async with b.subscribe(channel) as first:
        async with b.subscribe(channel) as second:
            await a.publish(channel, {"k": 1})
            assert await second.get(timeout=5) == {"k": 1}
        await a.publish(channel, {"k": 2})
        assert [await first.get(timeout=5), await first.get(timeout=5)] == [{"k": 1}, {"k": 2}]


async def test_a_reader_whose_subscription_redis_never_confirms_goes_on_lagged(monkeypatch):
    monkeypatch.setattr(redis_bus, "JOIN_TIMEOUT", 0.2)
    bus = RedisBus("redis://127.0.0.1:1/0")  # nothing listens there: never connected
    async with bus.subscribe("run:x") as sub:
        assert sub.lagged  # so its reader reads the log on its timer instead of trusting the bus
    await bus.close()

"""Redis pub/sub bus, so several replicas see each other's events live.

Each process holds one pattern subscription and fans messages out locally; a
message published here comes back through Redis like any other, so local and
remote readers see one order.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any

import redis.asyncio as redis

from orchestrator.events.bus import EventBus

log = logging.getLogger(__name__)
PREFIX = "orch:bus:"
OUTBOX_LIMIT = 100_000  # messages queued while Redis does not answer, at most


class RedisBus(EventBus):
    name = "redis"

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.redis = redis.from_url(url, decode_responses=True)
        self._reader: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._outbox: list[tuple[str, str]] = []
        self._publisher: asyncio.Task[None] | None = None
        self.dropped = 0  # messages never published (Redis unreachable); readers recover from the log

    async def start(self) -> None:
        self._reader = asyncio.create_task(self._read_forever(), name="redis-bus-reader")
        await asyncio.wait_for(self._ready.wait(), 10)

    async def close(self) -> None:
        if self._publisher is not None and not self._publisher.done():
            try:  # what is queued still goes out: a reader elsewhere may wait on a final event
                await asyncio.wait_for(asyncio.shield(self._publisher), 2.0)
            except (TimeoutError, Exception):
                self._publisher.cancel()
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        await self.redis.aclose()

    async def publish(self, channel: str, message: dict[str, Any]) -> None:
        await self.publish_many([(channel, message)])

    async def publish_many(self, messages: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Queue the messages for the publisher task and return: nothing waits on Redis.

        Every write of every run publishes, and a Redis command from redis-py costs about as
        much CPU as the database statement it follows; one task sends whatever has queued up
        meanwhile as one pipeline (in order), so under load the cost is shared. A message the
        bus loses (Redis down, this process killed) costs a reader only latency: readers fill
        any gap from the log. Nor can a Redis failure now fail a write that has committed.
        """
        for channel, message in messages:
            self._outbox.append((PREFIX + channel, json.dumps(message, separators=(",", ":"))))
        if len(self._outbox) > OUTBOX_LIMIT:  # Redis has been gone a while: keep the newest
            dropped = len(self._outbox) - OUTBOX_LIMIT
            del self._outbox[:dropped]
            self.dropped += dropped
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.create_task(self._publish_outbox(), name="redis-bus-publisher")

    async def _publish_outbox(self) -> None:
        backoff = 0.05
        while self._outbox:
            batch, self._outbox = self._outbox, []
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for channel, data in batch:
                        pipe.publish(channel, data)
                    await pipe.execute()
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.dropped += len(batch)
                log.warning("redis bus publish failed (%d messages dropped): %s", len(batch), exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def _read_forever(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.psubscribe(PREFIX + "*")
                self._ready.set()
                backoff = 0.1
                async for msg in pubsub.listen():
                    if msg.get("type") != "pmessage":
                        continue
                    channel = msg["channel"][len(PREFIX):]
                    if channel not in self._subs:
                        continue  # nobody here reads this run: not worth decoding
                    try:
                        payload = json.loads(msg["data"])
                    except ValueError:
                        continue
                    self.deliver(channel, payload)
            except asyncio.CancelledError:
                await pubsub.aclose()
                raise
            except Exception as exc:  # reconnect: readers recover missed events from the log
                log.warning("redis bus connection lost: %s", exc)
                self.reconnects += 1
                for subs in list(self._subs.values()):
                    for sub in subs:
                        sub.lagged = True
                try:
                    await pubsub.aclose()
                except Exception:
                    pass
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

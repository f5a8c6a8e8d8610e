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


class RedisBus(EventBus):
    name = "redis"

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.redis = redis.from_url(url, decode_responses=True)
        self._reader: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        self._reader = asyncio.create_task(self._read_forever(), name="redis-bus-reader")
        await asyncio.wait_for(self._ready.wait(), 10)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        await self.redis.aclose()

    async def publish(self, channel: str, message: dict[str, Any]) -> None:
        await self.redis.publish(PREFIX + channel, json.dumps(message, separators=(",", ":")))

    async def publish_many(self, messages: Sequence[tuple[str, dict[str, Any]]]) -> None:
        if not messages:
            return
        if len(messages) == 1:
            await self.publish(*messages[0])
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for channel, message in messages:
                pipe.publish(PREFIX + channel, json.dumps(message, separators=(",", ":")))
            await pipe.execute()

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

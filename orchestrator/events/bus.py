"""The bus interface and its in-process implementation."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

QUEUE_SIZE = 1024


class Subscription:
    """Messages for one channel, delivered to one reader. ``lagged`` is set when some were dropped."""

    def __init__(self, bus: EventBus, channel: str) -> None:
        self._bus = bus
        self.channel = channel
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_SIZE)
        self.lagged = False

    async def get(self, timeout: float | None = None) -> dict[str, Any] | None:  # noqa: ASYNC109 (None on timeout)
        """The next message, or ``None`` after ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None

    def drain(self) -> list[dict[str, Any]]:
        out = []
        while not self.queue.empty():
            out.append(self.queue.get_nowait())
        return out

    def offer(self, message: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.lagged = True

    async def __aenter__(self) -> Subscription:
        await self._bus.joined(self)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._bus.unsubscribe(self)


class EventBus:
    """Base class: local fan-out to subscribers; subclasses decide how ``publish`` travels."""

    name = "base"

    def __init__(self) -> None:
        self._subs: dict[str, set[Subscription]] = defaultdict(set)
        self.delivered = 0  # messages handed to local subscribers (metrics)
        self.reconnects = 0  # lost connections (metrics; only a remote bus has any)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def subscribe(self, channel: str) -> Subscription:
        sub = Subscription(self, channel)
        self._subs[channel].add(sub)
        return sub

    async def joined(self, sub: Subscription) -> None:
        """Return once messages published to ``sub``'s channel from now on will reach it (an
        in-process bus: at once). A reader that then reads the log misses nothing."""
        return None

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.channel)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.channel]

    def deliver(self, channel: str, message: dict[str, Any]) -> None:
        self.delivered += 1
        for sub in list(self._subs.get(channel, ())):
            sub.offer(message)

    async def publish(self, channel: str, message: dict[str, Any]) -> None:
        raise NotImplementedError

    async def publish_many(self, messages: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Publish several messages in order; a remote bus sends them in one round trip."""
        for channel, message in messages:
            await self.publish(channel, message)

    async def ping(self) -> bool:
        return True


class InProcessBus(EventBus):
    """The embedded default: one process, no network."""

    name = "inprocess"

    async def publish(self, channel: str, message: dict[str, Any]) -> None:
        self.deliver(channel, message)


def create_bus(redis_url: str | None) -> EventBus:
    if redis_url:
        from orchestrator.events.redis_bus import RedisBus

        return RedisBus(redis_url)
    return InProcessBus()

"""Redis pub/sub bus, so several replicas see each other's events live.

Each process subscribes to exactly the channels it has local readers for (a run's channel while
someone streams or long-polls it there, the control channel where a worker runs), and fans
messages out locally. A message published here comes back through Redis like any other, so
local and remote readers see one order.

Why per channel and not one pattern for everything: with a pattern, every replica receives and
parses every event of every run, so the bus's work grows with replicas times events; per
channel, a message goes only where someone reads it. The price is a SUBSCRIBE when a reader
starts, and the reader waits for Redis to confirm it (``joined``) before it reads the log, so
that nothing published after that read can pass it by.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import redis.asyncio as redis

from orchestrator.events.bus import EventBus, Subscription

log = logging.getLogger(__name__)
PREFIX = "orch:bus:"
OUTBOX_LIMIT = 100_000  # messages queued while Redis does not answer, at most
# How long a new reader waits for Redis to confirm its channel. Past it (Redis is down or slow)
# the reader goes on flagged ``lagged``: it reads the log on its timer instead of trusting the bus.
JOIN_TIMEOUT = 2.0


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
        # This process's own channel, always subscribed: a connection subscribed to nothing
        # would end redis-py's listen().
        self._home = f"{PREFIX}_process:{os.getpid()}:{secrets.token_hex(4)}"
        self._pubsub: Any = None  # the reader's PubSub on the current connection
        self._requested: set[str] = set()  # channels SUBSCRIBEd on it (and not UNSUBSCRIBEd since)
        self._unconfirmed: dict[str, int] = defaultdict(int)  # SUBSCRIBEs sent, not yet confirmed
        self._live: set[str] = set()  # channels Redis has confirmed for the current request
        self._waiters: dict[str, list[asyncio.Future[None]]] = defaultdict(list)
        self._changed = asyncio.Event()
        self._membership: asyncio.Task[None] | None = None
        self.received = 0  # messages Redis sent this process (its channels' only)

    async def start(self) -> None:
        self._reader = asyncio.create_task(self._read_forever(), name="redis-bus-reader")
        self._membership = asyncio.create_task(self._follow_readers(), name="redis-bus-membership")
        await asyncio.wait_for(self._ready.wait(), 10)

    async def close(self) -> None:
        if self._publisher is not None and not self._publisher.done():
            try:  # what is queued still goes out: a reader elsewhere may wait on a final event
                await asyncio.wait_for(asyncio.shield(self._publisher), 2.0)
            except (TimeoutError, Exception):
                self._publisher.cancel()
        for task in (self._membership, self._reader):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        await self.redis.aclose()

    # ---- which channels this process reads ----------------------------------------------

    def subscribe(self, channel: str) -> Subscription:
        sub = super().subscribe(channel)
        self._changed.set()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        super().unsubscribe(sub)
        self._changed.set()

    async def joined(self, sub: Subscription) -> None:
        channel = PREFIX + sub.channel
        if channel in self._live:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[channel].append(waiter)
        self._changed.set()
        try:
            await asyncio.wait_for(waiter, JOIN_TIMEOUT)
        except TimeoutError:
            sub.lagged = True
        finally:
            if waiter in self._waiters.get(channel, ()):
                self._waiters[channel].remove(waiter)
                if not self._waiters[channel]:
                    del self._waiters[channel]

    async def _follow_readers(self) -> None:
        """SUBSCRIBE the channels that gained their first local reader, UNSUBSCRIBE those that
        lost their last, whenever they change (one command each way for all of them)."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            pubsub = self._pubsub
            if pubsub is None:  # between connections: the reader asks again once connected
                continue
            wanted = {PREFIX + c for c in self._subs}
            add, drop = wanted - self._requested, self._requested - wanted
            try:
                if add:
                    self._requested |= add
                    for channel in add:
                        self._unconfirmed[channel] += 1
                    await pubsub.subscribe(*add)
                if drop:
                    self._requested -= drop
                    self._live -= drop
                    await pubsub.unsubscribe(*drop)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the connection is going: the reader reconnects and resubscribes
                log.warning("redis bus subscribe failed: %s", exc)

    def _confirmed(self, channel: str) -> None:
        """Redis confirmed a SUBSCRIBE: once the last one sent for ``channel`` is, it is live."""
        if self._unconfirmed.get(channel, 0) > 0:
            self._unconfirmed[channel] -= 1
        if self._unconfirmed.get(channel, 0) == 0:
            self._unconfirmed.pop(channel, None)
            if channel in self._requested:
                self._live.add(channel)
                for waiter in self._waiters.pop(channel, ()):
                    if not waiter.done():
                        waiter.set_result(None)

    # ---- publishing ----------------------------------------------------------------------

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
                await pubsub.subscribe(self._home)
                self._requested, self._live = set(), set()
                self._unconfirmed.clear()
                self._pubsub = pubsub
                self._changed.set()  # subscribe this connection to every channel read here
                self._ready.set()
                backoff = 0.1
                async for msg in pubsub.listen():
                    kind = msg.get("type")
                    if kind == "subscribe":
                        self._confirmed(msg["channel"])
                        continue
                    if kind != "message":
                        continue
                    self.received += 1
                    channel = msg["channel"][len(PREFIX):]
                    if channel not in self._subs:
                        continue  # its last reader here left since: not worth decoding
                    try:
                        payload = json.loads(msg["data"])
                    except ValueError:
                        continue
                    self.deliver(channel, payload)
            except asyncio.CancelledError:
                self._pubsub = None
                await pubsub.aclose()
                raise
            except Exception as exc:  # reconnect: readers recover missed events from the log
                self._pubsub = None
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

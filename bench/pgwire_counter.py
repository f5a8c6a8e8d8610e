"""Count PostgreSQL round trips on the wire: a TCP proxy that reads the client's side of the protocol.

Placed between a service and PostgreSQL, it counts what any driver sends, so asyncpg (the
orchestrator) and psycopg (DBOS) are measured by the same rule, without trusting either's own
instrumentation:

- per connection, the first message is untyped (``int32 length`` + ``int32 code``): a startup
  packet, or an ``SSLRequest`` / ``GSSENCRequest``, which the proxy itself declines with ``N`` so
  that the rest of the stream stays readable (plain TCP on loopback, as without the proxy when the
  server has no TLS);
- every later message is ``type byte + int32 length (itself included) + body``;
- a round trip is a simple query (``Q``), the end of an extended-protocol exchange (``S``, Sync:
  the client waits for ``ReadyForQuery``), or a Flush (``H``): asyncpg prepares a statement with
  Parse + Describe + Flush and waits for the description before it binds, a round trip that
  counting Q and S alone would miss. A driver that pipelines several Syncs or Flushes before
  reading (psycopg's pipeline mode) is counted once per message, so the figure is an upper bound
  there. ``snapshot()`` also gives Q, S and H apart, and every other message type's count.

    with pgwire_proxy("127.0.0.1", 5432) as (port, counts):
        ...  # point the service at 127.0.0.1:port
        print(counts.snapshot())
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from collections.abc import Iterator

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
ROUND_TRIP_TYPES = ("Q", "S", "H")


@dataclass
class WireCounts:
    """Totals over every connection the proxy has carried; read them with ``snapshot()``."""

    connections: int = 0
    messages: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str) -> None:
        with self.lock:
            self.messages[kind] += 1

    def opened(self) -> None:
        with self.lock:
            self.connections += 1

    def snapshot(self) -> dict[str, int]:
        """``round_trips`` (Q + S + H), ``connections`` opened, and each message type's count
        (``msg_Q``, ``msg_S``, ``msg_P`` for Parse, ...)."""
        with self.lock:
            counts = {"round_trips": sum(self.messages[k] for k in ROUND_TRIP_TYPES),
                      "connections": self.connections}
            counts.update({f"msg_{k}": v for k, v in sorted(self.messages.items())})
            return counts


class FrontendParser:
    """Splits the client's byte stream into messages, whatever the TCP segmentation."""

    def __init__(self, counts: WireCounts) -> None:
        self.counts = counts
        self.buffer = bytearray()
        self.started = False  # past the untyped startup packet

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """Count the complete messages in ``data``; return (bytes to forward to the server, bytes
        the proxy answers itself: ``N`` to an SSL/GSS request, which is then not forwarded)."""
        forward = bytearray(data) if self.started else bytearray()
        reply = bytearray()
        self.buffer += data
        while True:
            if not self.started:  # untyped: int32 length + int32 code; held back until complete
                if len(self.buffer) < 8:
                    break
                length, code = struct.unpack("!ii", self.buffer[:8])
                if len(self.buffer) < length:
                    break
                packet = bytes(self.buffer[:length])
                del self.buffer[:length]
                if code in (SSL_REQUEST, GSSENC_REQUEST):
                    reply += b"N"  # the client goes on with a plain startup packet
                    continue
                forward += packet
                if code != CANCEL_REQUEST:
                    self.started = True
                    forward += self.buffer  # what followed the startup packet, not yet forwarded
                continue
            if len(self.buffer) < 5:
                break
            kind = bytes(self.buffer[:1])
            (length,) = struct.unpack("!i", self.buffer[1:5])
            if len(self.buffer) < 1 + length:
                break
            del self.buffer[:1 + length]
            self.counts.add(kind.decode("latin-1"))
        return bytes(forward), bytes(reply)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _client_to_server(reader: asyncio.StreamReader, client: asyncio.StreamWriter,
                            upstream: asyncio.StreamWriter, parser: FrontendParser) -> None:
    """Forward the client's bytes, minus the SSL/GSS requests the proxy answers itself."""
    try:
        while data := await reader.read(65536):
            forward, reply = parser.feed(data)
            if reply:
                client.write(reply)
                await client.drain()
            if forward:
                upstream.write(forward)
                await upstream.drain()
    except ConnectionError:
        pass
    finally:
        upstream.close()


class WireProxy:
    """The proxy's server on its own event loop thread, so a synchronous caller can use it."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.counts = WireCounts()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pgwire-proxy", daemon=True)
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counts.opened()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        parser = FrontendParser(self.counts)
        await asyncio.gather(_client_to_server(reader, writer, up_writer, parser), _pipe(up_reader, writer))

    def start(self) -> int:
        """Listen on a free loopback port; return it."""
        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._handle, "127.0.0.1", 0), self.loop)
        self.server = future.result(10)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    def stop(self) -> None:
        async def close() -> None:
            if self.server is not None:
                self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@contextmanager
def pgwire_proxy(upstream_host: str, upstream_port: int) -> Iterator[tuple[int, WireCounts]]:
    """A counting proxy in front of PostgreSQL for the duration of the block: (its port, counts)."""
    proxy = WireProxy(upstream_host, upstream_port)
    port = proxy.start()
    try:
        yield port, proxy.counts
    finally:
        proxy.stop()

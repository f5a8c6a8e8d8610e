"""bench/pgwire_counter.py counts real round trips: asyncpg through the proxy to the real PostgreSQL.

The figure ``round_trips_per_run`` of ``bench/control_plane.py --vs-dbos`` rests on this parser;
here it must see exactly the messages asyncpg sends for a known sequence of calls.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import asyncpg
import pytest

from bench.pgwire_counter import pgwire_proxy
from bench.vs_dbos import via

pytestmark = pytest.mark.postgres


async def test_counts_asyncpg_round_trips(pg_dsn: str) -> None:
    pg = urlsplit(pg_dsn)
    with pgwire_proxy(pg.hostname or "127.0.0.1", pg.port or 5432) as (port, counts):
        conn = await asyncpg.connect(via(pg_dsn, port))
        try:
            before = counts.snapshot()
            await conn.execute("SELECT 1")  # simple protocol: one Q
            for i in range(5):  # one prepare (Parse, Describe, Flush), then Bind/Execute/Sync each
                assert await conn.fetchval("SELECT $1::int", i) == i
            after = counts.snapshot()
        finally:
            await conn.close()
    assert before["connections"] == 1
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert (delta["msg_Q"], delta["msg_H"], delta["msg_S"], delta["msg_E"]) == (1, 1, 5, 5)
    assert delta["round_trips"] == 7

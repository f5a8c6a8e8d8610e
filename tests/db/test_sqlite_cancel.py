"""A statement cancelled while aiosqlite's thread runs it must not leave SQLite locked.

The thread finishes the statement whatever the caller does. SQLAlchemy's default is to treat
the interrupt as a lost connection and close it without closing the cursor first, and a
SQLite connection closed under an unfinished statement (an ``UPDATE ... RETURNING`` whose
rows were not read) stays open as a "zombie" that keeps its write lock until the garbage
collector frees the cursor. Every other writer then waited out the 30 s busy timeout: a
worker's shutdown did, when it cancelled an execution in the middle of a checkpoint.
"""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event, text

from orchestrator.db import create_engine

STARTED = threading.Event()


def _slow(x: int) -> int:
    """Runs in aiosqlite's thread, inside the statement: long enough to cancel the caller."""
    STARTED.set()
    time.sleep(0.3)
    return x


def _write_lock_free(path: Path) -> bool:
    """Whether another connection can take SQLite's write lock now, without waiting."""
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError as exc:
        assert "locked" in str(exc)
        return False
    finally:
        other.close()


async def test_a_cancelled_write_leaves_no_lock_behind(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    engine = create_engine(f"sqlite+aiosqlite:///{path}")

    @event.listens_for(engine.sync_engine, "connect")
    def _register(dbapi_conn: Any, _record: Any) -> None:  # the driver's own connection, in aiosqlite's thread
        dbapi_conn.run_async(lambda c: c.create_function("slow", 1, _slow))

    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE t (x INTEGER)"))
        await conn.execute(text("INSERT INTO t VALUES (1)"))

    async def write() -> None:
        async with engine.begin() as conn:
            (await conn.execute(text("UPDATE t SET x = x + 1 RETURNING slow(x)"))).all()

    gc.disable()  # the zombie connection lives until a collection frees its cursor
    try:
        STARTED.clear()
        task = asyncio.create_task(write())
        assert await asyncio.to_thread(STARTED.wait, 30)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()
        assert _write_lock_free(path)  # before the fix: 'database is locked' until gc ran
        async with engine.begin() as conn:  # and the pool hands out a usable connection
            assert (await conn.execute(text("SELECT x FROM t"))).scalar_one() == 1  # the update rolled back
    finally:
        gc.enable()
        await engine.dispose()

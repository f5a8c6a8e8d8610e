"""Engine creation and migrations applied at start.

Migrations run through Alembic on the service's own async connection. On
PostgreSQL an advisory lock serialises replicas that start at the same moment.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import event, make_url, text
from sqlalchemy.engine import Connection, ExceptionContext
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_MIGRATION_LOCK_ID = 0x0_6F_72_63_68  # "orch"
# PostgreSQL ends a session that sits this long inside a transaction. None of ours waits on
# anything but the database, so only a paused or stalled process (SIGSTOP, a frozen VM) does
# that, and it holds its row locks meanwhile: claims skip locked rows, so no replica could
# take over a run it had touched until it ran again, however long its lease had expired.
IDLE_IN_TRANSACTION_MS = 5000
# Every statement the service sends is prepared once per connection (asyncpg) and then executed
# with new parameters. In PostgreSQL's default mode a prepared statement is planned again on each
# execution while a custom plan looks cheaper than the generic one, which for the store's
# data-modifying CTEs it does: 0.3-0.4 ms of planning for a 1-2 ms claim. With the generic plan
# the database spent 2.6-3.1 ms of CPU per 3-step run instead of 3.7-4.2 (bench/vs_dbos.py's
# runs phase, three alternations, 2026-12-04). The plans were checked on a 50,000-run table:
# the same index scans as the custom ones, as the statements' selective conditions (status =
# 'queued', the id, the tenant) are literals or equalities an index answers whatever the value.
PLAN_CACHE_MODE = "force_generic_plan"


def _private_sqlite_file(path: str) -> None:
    """Make the database file 0600, in a 0700 directory when we create that, whatever the umask.

    It holds every tenant's run inputs and outputs. SQLite gives the ``-wal``, ``-shm`` and
    ``-journal`` files the mode of the database file, so creating it 0600 first covers them;
    files left by an older version with a wider mode are narrowed. An existing directory keeps
    its mode (it may be shared, like /tmp or the working directory).
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)  # makedirs' mode is masked by the umask
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm", "-journal"):
        try:
            os.chmod(path + suffix, 0o600)
        except FileNotFoundError:
            pass


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    """Create the async engine; SQLite gets WAL mode, a busy timeout and foreign keys, PostgreSQL
    a pool of ``pool_size`` connections kept open and a bound on idle transactions.

    PostgreSQL's pool does not ping a connection on checkout (``pool_pre_ping`` costs three round
    trips, BEGIN / ``;`` / ROLLBACK, on every checkout: a quarter of a step's). asyncpg notices a
    connection the server closed (a restart, an admin's ``pg_terminate_backend``) as soon as the
    event loop reads its EOF, so checkout only asks the driver whether it is closed, and a closed
    one is replaced before use. A connection that breaks mid-statement fails that statement and
    SQLAlchemy (or ``RunStore._raw``) throws it away. Overflow connections stay few: each one is
    opened and closed again around a single burst.
    """
    if url.startswith("sqlite"):
        path = make_url(url).database
        if path and path != ":memory:":
            _private_sqlite_file(path)  # every tenant's runs: 0600
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:  # pragma: no cover
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        event.listen(engine.sync_engine, "handle_error", _sqlite_cancel_is_not_a_disconnect)
        return engine
    engine = create_async_engine(url, pool_size=pool_size, max_overflow=max(4, pool_size // 4), connect_args={
        "server_settings": {"idle_in_transaction_session_timeout": str(IDLE_IN_TRANSACTION_MS),
                            "plan_cache_mode": PLAN_CACHE_MODE}})

    @event.listens_for(engine.sync_engine, "checkout")
    def _closed(_dbapi_conn: DBAPIConnection, record: ConnectionPoolEntry, _proxy: PoolProxiedConnection) -> None:
        if driver_closed(record.driver_connection):
            raise DisconnectionError("the server closed this connection")  # the pool retries with a new one

    return engine


def _sqlite_cancel_is_not_a_disconnect(ctx: ExceptionContext) -> None:
    """Keep a SQLite connection whose statement was cancelled, so it is rolled back, not closed.

    SQLAlchemy treats a ``CancelledError`` in the middle of a statement as a lost connection
    and closes it without closing the cursor, which is right for a server that may still be
    running the statement. aiosqlite's thread finishes the statement anyway, and a SQLite
    connection closed under an unfinished statement (``UPDATE ... RETURNING`` not yet read)
    lingers as a zombie that keeps its write lock until the garbage collector frees the cursor:
    every other writer then waited out the busy timeout (a worker's shutdown did, 30 s, when it
    cancelled an execution mid-checkpoint). Kept, the cursor is closed and the transaction
    rolled back by the operations queued behind the statement on the same thread.
    """
    if ctx.is_disconnect and isinstance(ctx.original_exception, asyncio.CancelledError):
        ctx.is_disconnect = False


def driver_closed(driver: object) -> bool:
    """Whether asyncpg already knows its connection is gone (no round trip)."""
    is_closed = getattr(driver, "is_closed", None)
    return bool(is_closed()) if callable(is_closed) else False


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def _upgrade(connection: Connection) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_ID})
    command.upgrade(cfg, "head")


async def migrate(engine: AsyncEngine) -> None:
    """Apply every pending migration (idempotent)."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade)

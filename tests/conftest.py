"""Shared fixtures: real SQLite, PostgreSQL and Redis; the service on loopback. And the fast
tier's guard: a test that starts a server subprocess must be marked ``slow``."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import Settings
from tests import servers
from tests.services import create_database, drop_database, postgres_server, redis_server, sqlalchemy_url

DEV_KEYS = {"sk-test-a": "tenant-a", "sk-test-b": "tenant-b"}
FAST = dict(worker_poll_seconds=0.1, heartbeat_seconds=0.3, lease_seconds=1.5, sse_keepalive_seconds=1.0,
            log_json=True)


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    with postgres_server() as dsn:
        yield dsn


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture
def pg_database(pg_dsn: str) -> Iterator[str]:
    """A fresh PostgreSQL database (SQLAlchemy URL) for one test.

    A sync fixture on purpose: it can then be requested from other sync fixtures.
    """
    name = asyncio.run(create_database(pg_dsn))
    try:
        yield sqlalchemy_url(pg_dsn, name)
    finally:
        asyncio.run(drop_database(pg_dsn, name))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path}/orch.db"


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_settings(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[..., Settings]:
    """Settings for the parametrised backend: SQLite + in-process bus, or PostgreSQL + Redis."""
    if backend == "postgres":
        db = request.getfixturevalue("pg_database")
        redis = request.getfixturevalue("redis_url")
    else:
        db, redis = f"sqlite+aiosqlite:///{tmp_path}/orch.db", None

    def build(**overrides: object) -> Settings:
        values: dict[str, object] = dict(database_url=db, redis_url=redis, api_keys=DEV_KEYS, **FAST)
        values.update(overrides)
        return Settings(**values)

    return build


# The fast tier (`make test-fast`: -m "not slow and not sglang") starts no server subprocess. So
# that its marks cannot drift, a test that starts one (the service, the simulator) without a
# `slow` or `sglang` mark fails, in every tier, saying so.
_running: pytest.Item | None = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    global _running
    _running = item  # through setup, call and teardown, where fixtures start servers too
    try:
        return (yield)
    finally:
        _running = None


def _slow_only(start: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(start)
    def guarded(self: object, *args: Any, **kwargs: Any) -> Any:
        item = _running
        if item is not None and not (item.get_closest_marker("slow") or item.get_closest_marker("sglang")):
            pytest.fail(f"{item.nodeid} starts {type(self).__name__}, a server subprocess: mark it "
                        "@pytest.mark.slow (the fast tier starts none)", pytrace=False)
        return start(self, *args, **kwargs)
    return guarded


servers.ServiceProcess.start = _slow_only(servers.ServiceProcess.start)  # type: ignore[method-assign]
servers.SimServerProcess.start = _slow_only(servers.SimServerProcess.start)  # type: ignore[method-assign]

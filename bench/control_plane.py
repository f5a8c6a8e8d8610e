"""Control-plane benchmark: SQLite + in-process bus against PostgreSQL + Redis, side by side.

Each figure is measured over real HTTP against the service running as its own
process (uvicorn, as in production), so the benchmark's client never shares an
event loop with the server it measures. Every measurement gets a fresh store and
a fresh service process, so one test's rows or queued runs cannot slow the next.

    .venv/bin/python bench/control_plane.py --quick --json
    .venv/bin/python bench/control_plane.py --vs-dbos --quick --json   # against DBOS (bench/vs_dbos.py)

The machine is usually small and shared, so absolute numbers move between runs;
the ``ratios`` (postgres / sqlite) are the figures meant to be compared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

ROOT = Path(__file__).resolve().parent.parent
# Run as a script (``python bench/control_plane.py``): make the repository importable so
# the PostgreSQL/Redis discovery of the test suite is shared instead of copied.
sys.path.insert(0, str(ROOT))

from orchestrator.runs.states import FINAL_EVENT, RunStatus  # noqa: E402
from tests.servers import free_port  # noqa: E402
from tests.services import (  # noqa: E402
    create_database, drop_database, postgres_server, redis_server, sqlalchemy_url,
)

API_KEY = "sk-bench"
TENANT = "bench"
# Quotas must not be what is measured: one tenant submits everything.
LIMITS = {TENANT: {"max_concurrent_runs": 100_000, "requests_per_second": 100_000, "burst": 100_000}}
FINAL_TYPES = frozenset(FINAL_EVENT.values())
BACKENDS = ("sqlite", "postgres")

StoreFactory = Callable[[], AbstractContextManager[dict[str, str]]]


@dataclass(frozen=True)
class Profile:
    """How much work each measurement does."""

    submits: int  # POST /v1/runs counted in the submission test
    submit_in_flight: int  # concurrent submissions
    event_runs: int  # demo runs in the event-log test
    event_steps: int  # steps per demo run (3 events each)
    readers: int  # concurrent SSE readers on one run
    sse_steps: int
    sse_step_seconds: float


QUICK = Profile(submits=200, submit_in_flight=16, event_runs=8, event_steps=30,
                readers=100, sse_steps=20, sse_step_seconds=0.05)
FULL = Profile(submits=2000, submit_in_flight=16, event_runs=32, event_steps=100,
               readers=100, sse_steps=60, sse_step_seconds=0.05)


def log(message: str) -> None:
    """Progress goes to stderr so ``--json`` leaves stdout to the one result object."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---- stores and the service process -------------------------------------------------------------


@contextmanager
def sqlite_store(workdir: Path) -> Iterator[dict[str, str]]:
    """A new SQLite file; the embedded profile uses the in-process bus (no Redis URL)."""
    path = workdir / f"orch-{uuid.uuid4().hex[:8]}.db"
    yield {"ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{path}"}


@contextmanager
def postgres_store(dsn: str, redis_url: str) -> Iterator[dict[str, str]]:
    """A new PostgreSQL database, dropped afterwards even when the measurement failed."""
    name = asyncio.run(create_database(dsn))
    try:
        yield {"ORCH_DATABASE_URL": sqlalchemy_url(dsn, name), "ORCH_REDIS_URL": redis_url}
    finally:
        asyncio.run(drop_database(dsn, name))


def service_env(store: dict[str, str], port: int, extra: dict[str, str]) -> dict[str, str]:
    """The caller's environment without its ``ORCH_*`` settings, which would skew the run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env.update({
        "ORCH_HOST": "127.0.0.1", "ORCH_PORT": str(port), "ORCH_API_KEYS": f"{API_KEY}={TENANT}",
        "ORCH_TENANT_LIMITS": json.dumps(LIMITS), "ORCH_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT),
        **store, **extra,
    })
    return env


def wait_ready(proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout: float = 60) -> None:
    """Poll ``/readyz``; fail with the service's log if it exits or never gets ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"service not ready after {timeout} s:\n{log_path.read_text()[-3000:]}")


@contextmanager
def service(store: dict[str, str], workdir: Path, **settings: str) -> Iterator[str]:
    """Run the service as a separate process on a free port; yield its base URL, stop it after."""
    with service_process(store, workdir, **settings) as (url, _proc):
        yield url


@contextmanager
def service_process(store: dict[str, str], workdir: Path,
                    **settings: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``service``, yielding the process too (its CPU time is measured)."""
    port = free_port()
    log_path = workdir / f"service-{port}.log"
    env = service_env(store, port, {f"ORCH_{k.upper()}": v for k, v in settings.items()})
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-c", "from orchestrator.server import serve; serve()"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url, log_path)
        yield url, proc
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM for a clean shutdown (the worker hands its leases back), SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def client(url: str, connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"},
                             timeout=httpx.Timeout(120), limits=httpx.Limits(max_connections=connections))


# ---- small statistics helpers --------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: always a value that was actually observed."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


# ---- HTTP helpers ----------------------------------------------------------------------------------


async def submit(http: httpx.AsyncClient, workflow: str, inp: dict[str, Any]) -> dict[str, Any]:
    response = await http.post("/v1/runs", json={"workflow": workflow, "input": inp})
    if response.status_code != 201:
        raise RuntimeError(f"submit {workflow} answered {response.status_code}: {response.text}")
    return response.json()


async def wait_terminal(http: httpx.AsyncClient, run_id: str, timeout: float) -> dict[str, Any]:
    """Long-poll the run until it is finished (the server caps each wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = (await http.get(f"/v1/runs/{run_id}", params={"wait": 30})).json()
        if RunStatus(run["status"]).terminal:
            return run
    raise TimeoutError(f"run {run_id} not finished after {timeout} s")


async def wait_status(http: httpx.AsyncClient, run_id: str, leave: RunStatus, timeout: float = 30) -> None:
    """Poll until the run has left ``leave`` (used to see a run picked up by the worker)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await http.get(f"/v1/runs/{run_id}")).json()["status"] != leave:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"run {run_id} still {leave} after {timeout} s")


# ---- 1. submissions ------------------------------------------------------------------------------


async def measure_submit(url: str, profile: Profile) -> dict[str, Any]:
    """POST /v1/runs of ``echo`` with ``submit_in_flight`` requests outstanding at any time.

    The service runs without a worker, so only the submit path (validation, quota
    check, insert, first event, notification) is on the clock.
    """
    async with client(url, profile.submit_in_flight + 4) as http:
        for i in range(profile.submit_in_flight):  # warm connections and the pool, not counted
            await submit(http, "echo", {"message": f"warm-{i}"})
        latencies: list[float] = []
        jobs = iter(range(profile.submits))

        async def submitter() -> None:
            for i in jobs:
                start = time.perf_counter()
                await submit(http, "echo", {"message": i})
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(submitter() for _ in range(profile.submit_in_flight)))
        wall = time.perf_counter() - start
    return {"submits": profile.submits, "in_flight": profile.submit_in_flight,
            "submit_per_s": round(profile.submits / wall, 1),
            "submit_mean_ms": ms(sum(latencies) / len(latencies)),
            "submit_p50_ms": ms(percentile(latencies, 0.50)), "submit_p99_ms": ms(percentile(latencies, 0.99))}


# ---- 2. durable event log ------------------------------------------------------------------------


async def measure_events(url: str, profile: Profile) -> dict[str, Any]:
    """Events written per second by the worker running ``demo`` steps that do no work.

    Each step appends ``step.started``, ``step.completed`` and a progress event, each
    in its own transaction, so this is the rate of durable appends plus notifications.
    The clock runs from the first submit to the last run's server-side ``finished_at``.
    """
    inp = {"steps": profile.event_steps, "step_seconds": 0}
    async with client(url, profile.event_runs + 4) as http:
        start = time.time()
        runs = await asyncio.gather(*(submit(http, "demo", inp) for _ in range(profile.event_runs)))
        done = await asyncio.gather(*(wait_terminal(http, r["id"], 600) for r in runs))
    failed = [r["id"] for r in done if r["status"] != RunStatus.SUCCEEDED]
    if failed:
        raise RuntimeError(f"demo runs did not succeed: {failed}")
    events = sum(r["last_event_seq"] for r in done)
    wall = max(r["finished_at"] for r in done) - start
    return {"runs": profile.event_runs, "steps_per_run": profile.event_steps, "events": events,
            "events_per_s": round(events / wall, 1)}


# ---- 3. SSE fan-out ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    seq: int
    created_at: float
    received_at: float


async def read_stream(http: httpx.AsyncClient, run_id: str, ready: asyncio.Event) -> list[Received]:
    """One SSE reader: every event it was sent, stamped on arrival; ``ready`` once the
    first one (replayed from the log) is in, which means its live subscription exists."""
    got: list[Received] = []
    headers = {"Accept": "text/event-stream"}
    async with http.stream("GET", f"/v1/runs/{run_id}/events", headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # id:/event: repeat what data carries; retry: and keep-alives carry nothing
            event = json.loads(line[5:])
            got.append(Received(event["seq"], event["created_at"], time.time()))
            ready.set()
            if event["type"] in FINAL_TYPES:
                break
    return got


async def fan_out(url: str, profile: Profile) -> tuple[dict[str, Any], list[list[Received]], float]:
    """Hold the run in the queue until every reader is attached, then let it go.

    The service runs one run at a time; a ``sleep`` run occupies that slot, the
    ``demo`` run waits behind it, and cancelling the sleeper releases it. Returns the
    finished run, each reader's events, and the release time.
    """
    async with client(url, 8) as http, client(url, profile.readers + 8) as streams:
        blocker = await submit(http, "sleep", {"seconds": 3600})
        await wait_status(http, blocker["id"], leave=RunStatus.QUEUED)
        run = await submit(http, "demo", {"steps": profile.sse_steps, "step_seconds": profile.sse_step_seconds})
        ready = [asyncio.Event() for _ in range(profile.readers)]
        async with asyncio.TaskGroup() as group:
            readers = [group.create_task(read_stream(streams, run["id"], r)) for r in ready]
            await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 120)
            released = time.time()
            (await http.post(f"/v1/runs/{blocker['id']}/cancel")).raise_for_status()
        finished = await wait_terminal(http, run["id"], 120)
    return finished, [r.result() for r in readers], released


async def measure_sse(url: str, profile: Profile) -> dict[str, Any]:
    """Deliveries per second across all readers, delivery lag (arrival here minus the
    event's ``created_at`` in the service; same host, same clock) and completeness.

    The run's own pace (``run_s``) bounds the delivery rate: ``readers * run_events / run_s``
    is the most the readers could receive.
    """
    run, streams, released = await fan_out(url, profile)
    expected = list(range(1, run["last_event_seq"] + 1))
    complete = run["status"] == RunStatus.SUCCEEDED and all([e.seq for e in s] == expected for s in streams)
    live = [e for s in streams for e in s if e.received_at >= released]  # not the pre-release replay
    lags = [e.received_at - e.created_at for e in live]
    last = max(e.received_at for e in live)
    return {"readers": profile.readers, "run_events": run["last_event_seq"],
            "run_s": round(run["finished_at"] - run["started_at"], 3),
            "delivered": sum(len(s) for s in streams),
            "events_per_s": round(len(live) / (last - released), 1),
            "lag_p50_ms": ms(percentile(lags, 0.50)), "lag_p99_ms": ms(percentile(lags, 0.99)),
            "lag_max_ms": ms(max(lags)), "complete": complete}


# ---- one backend ----------------------------------------------------------------------------------


def bench_backend(name: str, fresh_store: StoreFactory, workdir: Path, profile: Profile) -> dict[str, Any]:
    """The three measurements, each on a fresh store behind a fresh service process."""
    result: dict[str, Any] = {}
    log(f"{name}: submissions ({profile.submits}, {profile.submit_in_flight} in flight, no worker)")
    with fresh_store() as store, service(store, workdir, worker_enabled="false") as url:
        result.update(asyncio.run(measure_submit(url, profile)))
    log(f"{name}: event log ({profile.event_runs} demo runs x {profile.event_steps} steps)")
    with fresh_store() as store, service(store, workdir) as url:
        result.update(asyncio.run(measure_events(url, profile)))
    log(f"{name}: SSE fan-out ({profile.readers} readers, {profile.sse_steps} steps)")
    with fresh_store() as store, service(store, workdir, worker_concurrency="1") as url:
        result["sse_fanout"] = asyncio.run(measure_sse(url, profile))
    log(f"{name}: {json.dumps(result)}")
    return result


def store_factories(names: list[str], workdir: Path, stack: ExitStack) -> dict[str, StoreFactory]:
    """Find PostgreSQL and Redis only when asked for (a fallback server may take a while)."""
    factories: dict[str, StoreFactory] = {}
    for name in names:
        if name == "sqlite":
            factories[name] = partial(sqlite_store, workdir)
        else:
            factories[name] = partial(postgres_store, stack.enter_context(postgres_server()),
                                      stack.enter_context(redis_server()))
    return factories


# ---- report ----------------------------------------------------------------------------------------


def headline(result: dict[str, Any]) -> dict[str, float]:
    """The figures compared across backends."""
    sse = result["sse_fanout"]
    return {"submit_per_s": result["submit_per_s"], "submit_p50_ms": result["submit_p50_ms"],
            "submit_p99_ms": result["submit_p99_ms"], "events_per_s": result["events_per_s"],
            "sse_events_per_s": sse["events_per_s"], "sse_lag_p50_ms": sse["lag_p50_ms"],
            "sse_lag_p99_ms": sse["lag_p99_ms"]}


def ratios(pg: dict[str, Any], lite: dict[str, Any]) -> dict[str, float | None]:
    a, b = headline(pg), headline(lite)
    return {k: round(a[k] / b[k], 2) if b[k] else None for k in a}


def machine() -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "sqlite_library": sqlite3.sqlite_version}


def table(report: dict[str, Any], names: list[str]) -> str:
    """A human-readable side-by-side view for runs without ``--json``."""
    rows = {name: headline(report[name]) for name in names}
    keys = list(next(iter(rows.values())))
    cols = names + (["pg/sqlite"] if "ratios" in report else [])
    lines = [f"{'figure':<18}" + "".join(f"{c:>14}" for c in cols)]
    for key in keys:
        cells = [rows[n][key] for n in names]
        if "ratios" in report:
            cells.append(report["ratios"]["postgres_over_sqlite"][key])
        lines.append(f"{key:<18}" + "".join(f"{c!s:>14}" for c in cells))
    lines += [f"{'sse complete':<18}" + "".join(f"{report[n]['sse_fanout']['complete']!s:>14}" for n in names)]
    return "\n".join(lines)


def run(names: list[str], profile: Profile, quick: bool) -> dict[str, Any]:
    """Benchmark each backend in turn; temp files, databases and processes go away on any exit."""
    report: dict[str, Any] = {"machine": machine(), "quick": quick}
    workdir = Path(tempfile.mkdtemp(prefix="orch-bench-"))
    try:
        with ExitStack() as stack:
            for name, factory in store_factories(names, workdir, stack).items():
                report[name] = bench_backend(name, factory, workdir, profile)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if set(BACKENDS) <= set(names):
        report["ratios"] = {"postgres_over_sqlite": ratios(report["postgres"], report["sqlite"])}
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run, under a minute")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout, nothing else")
    parser.add_argument("--vs-dbos", action="store_true",
                        help="instead: PostgreSQL + Redis side by side with DBOS Transact (bench/vs_dbos.py)")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated subset of: sqlite,postgres (default both)")
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(args.backends) - set(BACKENDS)
    if unknown or not args.backends:
        parser.error(f"--backends takes {','.join(BACKENDS)}; got {args.backends}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.vs_dbos:
        from bench import vs_dbos  # here: it imports this module's helpers

        vs_dbos.main(args.quick, args.json)
        return
    started = time.monotonic()
    report = run(args.backends, QUICK if args.quick else FULL, args.quick)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(report, indent=2) if args.json else table(report, args.backends))


if __name__ == "__main__":
    main()

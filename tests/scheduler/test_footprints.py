"""The program policy's incremental indexes agree with a full scan after every event.

``FootprintIndex`` keeps backend footprints, prefixes present and the waiting
queue by need in step from touched programs; a mistake there would silently admit too much or
too little. A random agent workload (two tenants, shared and private prefixes, tools, releases,
two backends small enough to pause and resume) is checked against a from-scratch scan."""

from __future__ import annotations

import random

import pytest

from scheduler.core import (
    BackendObserved, BackendView, ProgramReleased, RequestArrived, RequestFinished, Scheduler, Tick, ToolEnded,
)
from scheduler.core.state import Status


def scan_footprint(policy, backend: str) -> float:
    total, shared = 0.0, {}
    for p in policy.s.resident[backend].values():
        c = policy.cost(p, 0.0)
        if c and p.prefix_key is not None:
            shared[p.prefix_key] = max(shared.get(p.prefix_key, 0), p.prefix_tokens)
            c -= min(p.prefix_tokens, c)
        total += c
    return total + sum(shared.values())


def check(s: Scheduler) -> None:
    policy = s.policy
    for name in s.backends:
        resident = s.resident[name].values()
        assert policy.index.footprint(name) == pytest.approx(scan_footprint(policy, name), abs=1e-6)
        assert policy.index.busy(name) == pytest.approx(sum(policy.busy(p) for p in resident), abs=1e-6)
        assert policy.index.prefixes(name) == {p.prefix_key for p in resident if p.prefix_key is not None}
    waiting = sorted((policy.least_need(p), p.id) for p in s.waiting.values() if p.pending)
    assert [p.id for p in policy.index.waiting()] == [pid for _, pid in waiting]
    if waiting:
        cut = waiting[len(waiting) // 2][0]
        assert {p.id for p in policy.index.waiting(at_most=cut)} == {pid for need, pid in waiting if need <= cut}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_indexes_match_a_full_scan_after_every_event(seed: int) -> None:
    rng = random.Random(seed)
    s = Scheduler("program", backends=[BackendView("b0", 60_000, prefill_s_per_token=1e-4),
                                       BackendView("b1", 40_000, prefill_s_per_token=1e-4)])
    tokens: dict[str, int] = {}
    inflight: dict[str, str] = {}  # pid -> rid
    acting: set[str] = set()
    now, seq, pauses = 0.0, 0, 0

    def handle(event: object) -> None:
        s.handle(event)  # type: ignore[arg-type]
        for p in s.programs.values():  # what the core dispatched is now in flight
            for rid in p.inflight:
                inflight[p.id] = rid
        check(s)

    def arrive(pid: str) -> None:
        nonlocal seq
        seq += 1
        key = "shared" if int(pid[1:]) % 3 else f"own-{pid}"
        handle(RequestArrived(now, pid, f"{pid}-{seq}", tokens[pid], tenant=f"t{int(pid[1:]) % 2}",
                              max_tokens=rng.choice([128, 512, 2048]), prefix_key=key, prefix_tokens=1_500))

    for i in range(40):
        tokens[f"p{i}"] = rng.randint(2_000, 9_000)
        arrive(f"p{i}")
    for _ in range(1_500):
        now += rng.uniform(0.05, 0.5)
        r = rng.random()
        if r < 0.05:
            handle(Tick(now))
            for name, b in s.backends.items():
                handle(BackendObserved(now, name, b.capacity, rng.randint(0, b.capacity), 4, 0))
        elif r < 0.55 and inflight:
            pid = rng.choice(sorted(inflight))
            rid = inflight.pop(pid)
            out = rng.randint(20, 400)
            if rng.random() < 0.08:  # the agent is done
                handle(RequestFinished(now, rid, tokens[pid], out))
                handle(ProgramReleased(now, pid))
                del tokens[pid]
                fresh = f"p{seq + 1000}"
                tokens[fresh] = rng.randint(2_000, 6_000)
                arrive(fresh)
            else:
                tokens[pid] += out
                handle(RequestFinished(now, rid, tokens[pid] - out, out, tool=rng.choice(["bash", "search"])))
                acting.add(pid)
        elif acting:
            pid = rng.choice(sorted(acting))
            acting.discard(pid)
            tokens[pid] += rng.randint(50, 1_500)
            if rng.random() < 0.5:
                handle(ToolEnded(now, pid))
            arrive(pid)
        pauses = s.counters["pauses"]
    assert pauses > 0 and s.counters["resumes"] > 0  # the workload did exercise pause and resume
    assert any(p.status is Status.PAUSED for p in s.programs.values()) or s.counters["resumes"] > 10

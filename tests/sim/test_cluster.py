"""The virtual-time cluster: an hour of 8 replicas and 200 agent programs, fast and repeatable."""

from __future__ import annotations

import time

import pytest

from scheduler.sim.cluster import AgentWorkload, VirtualCluster, percentile
from scheduler.sim.engine import SimRequest


@pytest.mark.slow
def test_one_hour_eight_replicas_two_hundred_programs() -> None:
    cluster = VirtualCluster(8, "llama-3.1-8b-h100", seed=1)
    t0 = time.perf_counter()
    m = cluster.run_agents(AgentWorkload(programs=200), duration_s=3600)
    wall = time.perf_counter() - t0
    print(f"\nvirtual hour: {wall:.1f} s wall, {m.sim_seconds / wall:.0f} sim-s per wall-s, "
          f"{m.events / wall:.0f} events/s, {m.requests_finished} calls, {m.steps_per_minute:.0f} steps/min, "
          f"hit ratio {m.cache_hit_ratio:.3f}, TTFT p50 {m.ttft_p50_s * 1000:.0f} ms p99 {m.ttft_p99_s * 1000:.0f} ms, "
          f"{m.generation_tokens_per_s:.0f} gen tok/s, {m.retractions} retractions")
    assert m.sim_seconds == 3600
    assert m.requests_finished > 10_000 and m.agent_steps > 10_000
    assert 0.2 < m.cache_hit_ratio < 1
    assert 0 < m.ttft_p50_s <= m.ttft_p99_s
    assert wall < 120  # about 20-35 s on 2 shared cores; generous for loaded CI machines


def test_same_seed_same_cluster_run_and_different_seed_differs() -> None:
    def run(seed: int) -> tuple[int, int, int, float]:
        m = VirtualCluster(2, "llama-3.1-8b-h100", seed=seed).run_agents(AgentWorkload(programs=20), duration_s=300)
        return m.requests_finished, m.prompt_tokens, m.cached_tokens, m.ttft_p99_s

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_submit_at_a_time_with_finish_callback() -> None:
    cluster = VirtualCluster(2, "llama-3.1-8b-h100")
    done: list[tuple[str, float]] = []
    cluster.submit(SimRequest("x", list(range(1000)), max_new_tokens=10, ignore_eos=True), at=5.0, engine=1,
                   on_finish=lambda r: done.append((r.rid, r.arrival)))
    cluster.run()
    assert done == [("x", 5.0)]
    assert cluster.metrics().requests_finished == 1 and cluster.metrics().generation_tokens == 10


def test_percentile_nearest_rank() -> None:
    assert percentile([3, 1, 2, 4], 50) == 2 and percentile([3, 1, 2, 4], 99) == 4


def test_a_retain_request_protects_a_context_under_priority_eviction_and_not_under_lru() -> None:
    """The program policy's Retain on an engine with ``--radix-eviction-policy priority``: a
    one-token request over a context, ranked ahead, keeps it through a flood of later calls
    ranked by their dispatch time; on an LRU engine the same flood evicts it."""
    def cached_after_flood(eviction: str) -> int:
        cluster = VirtualCluster(1, "llama-3.1-8b-h100", kv_capacity_tokens=20_000,
                                 radix_eviction_policy=eviction)
        kept = cluster.fresh_tokens(6_000)
        done: list[SimRequest] = []
        cluster.submit(SimRequest("a", kept, max_new_tokens=4, ignore_eos=True, priority=1), at=0.0)
        cluster.submit(SimRequest("a-retain", kept, max_new_tokens=1, ignore_eos=True, priority=100), at=5.0)
        for i in range(6):  # 36k tokens of newer calls, ranked by their dispatch time (10..15)
            cluster.submit(SimRequest(f"f{i}", cluster.fresh_tokens(6_000), max_new_tokens=4, ignore_eos=True,
                                      priority=10 + i), at=10.0 + i)
        cluster.submit(SimRequest("a2", kept + [7], max_new_tokens=1, ignore_eos=True, priority=30), at=60.0,
                       on_finish=done.append)
        cluster.run(120)
        return done[0].cached_tokens

    assert cached_after_flood("priority") >= 5_999
    assert cached_after_flood("lru") == 0

"""The scheduler core driving simulated engines in virtual time (the benchmark's machinery)."""

from __future__ import annotations

import pytest

from scheduler.sim.agentic import AgenticSimulation
from scheduler.sim.workloads import CODING, STOCHASTIC


@pytest.mark.slow
def test_same_seed_same_figures_and_every_policy_sees_the_same_programs():
    a = AgenticSimulation("program", CODING, 24).run(300)
    b = AgenticSimulation("program", CODING, 24).run(300)
    assert a.figures() == b.figures() and a.steps > 0
    assert [p.turns for p in (CODING.program(0, i) for i in range(3))] == \
        [p.turns for p in (CODING.program(0, i) for i in range(3))]
    assert CODING.program(0, 0) != CODING.program(1, 0)


def test_families_look_like_their_sources():
    coding = [CODING.program(0, i) for i in range(200)]
    tool_s = sorted(t.tool_s for p in coding for t in p.turns if t.tool)
    assert tool_s[len(tool_s) * 99 // 100] < 20  # short and stable
    ctx = [CODING.system_tokens + p.task_tokens + sum(t.output_tokens + t.result_tokens for t in p.turns)
           for p in coding]
    assert sorted(ctx)[len(ctx) // 2] > 10_000  # contexts of tens of thousands of tokens
    stoch = sorted(t.tool_s for i in range(200) for t in STOCHASTIC.program(0, i).turns if t.tool)
    assert 10 < stoch[len(stoch) * 99 // 100] < 1000  # heavy tail: p99 tens to hundreds of seconds


@pytest.mark.slow
def test_past_kv_capacity_program_aware_policies_beat_request_centric():
    results = {p: AgenticSimulation(p, CODING, 64).run(900) for p in ("request", "thunderagent", "program")}
    req, ta, ours = results["request"], results["thunderagent"], results["program"]
    assert ours.kv_hit_ratio > ta.kv_hit_ratio > req.kv_hit_ratio
    assert ours.steps_per_min > req.steps_per_min * 1.5
    assert ours.recomputed_tokens < req.recomputed_tokens / 2
    assert ta.pauses > 0 and req.pauses == 0


@pytest.mark.slow
def test_ttl_pins_hold_the_kv_in_the_engine():
    r = AgenticSimulation("ttl", CODING, 16).run(600)
    assert r.kv_hit_ratio > 0.9  # under capacity, the pins keep every context


def test_completion_times_cover_every_program_started_in_the_window():
    """Figures are the window's; completion times are every started program's, finished after
    the window (no new program starts then), so a policy cannot look fair by leaving its slowest
    programs unfinished."""
    cut = AgenticSimulation("request", STOCHASTIC, 48).run(600, finish_limit=1.0)  # no finishing run
    full = AgenticSimulation("request", STOCHASTIC, 48).run(600)
    assert cut.unfinished > 0 and full.unfinished == 0
    assert {k: v for k, v in cut.figures().items() if "completion" not in k and k != "unfinished"} == \
        {k: v for k, v in full.figures().items() if "completion" not in k and k != "unfinished"}
    # the same programs: those done in the window plus those in flight at its end (at their age then)
    assert len(cut.completion_s) == len(full.completion_s) > full.programs_completed
    assert all(f >= c for f, c in zip(sorted(full.completion_s), sorted(cut.completion_s)))
    assert sorted(full.completion_s) != sorted(cut.completion_s)

"""``bench/rollout.py``: synchronous RL steps on the simulator (tiny configurations)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from bench.rollout import SETTINGS, RolloutSimulation, across_seeds, run, target_lines


@pytest.mark.parametrize("policy", ["request", "thunderagent", "program"])
def test_steps_are_synchronous_and_every_trajectory_is_counted(policy: str) -> None:
    """No trajectory of step k+1 starts before the last one of step k has ended; each step
    completes exactly what it launched; the caches are flushed between steps."""
    sim = RolloutSimulation(policy, "mini_swe", prompts=3, group=3, steps=3, engines=2, seed=7)
    r = sim.run_steps()
    assert [s.launched for s in r.steps] == [9, 9, 9]
    assert [s.completed for s in r.steps] == [9, 9, 9]
    assert len(r.trajs) == 27 and all(t.completed for t in r.trajs.values())
    for k, step in enumerate(r.steps):
        mine = [t for t in r.trajs.values() if t.step == k]
        assert step.end == max(t.ended for t in mine if t.ended is not None)
        assert all(step.start <= t.started <= (t.ended or 0) <= step.end for t in mine)
        if k + 1 < len(r.steps):
            assert r.steps[k + 1].start >= step.end
            assert min(t.started for t in r.trajs.values() if t.step == k + 1) >= step.end
        assert step.flushed
    f = r.figures()
    assert f["trajectories"] == f["completed"] == 27
    assert f["mean_step_s"] == pytest.approx(r.rollout_s / 3, abs=0.1)
    assert f["trajectories_per_min"] == pytest.approx(60 * 27 / r.rollout_s, rel=1e-3)
    # the trajectories' time splits into its parts, none negative
    acc = f["accounting"]["mean_trajectory"]
    assert min(acc.values()) >= 0
    assert acc["held_s"] + acc["queue_prefill_s"] + acc["decode_s"] + acc["tool_s"] == pytest.approx(
        acc["total_s"], abs=0.3)


def test_group_shares_its_prompt() -> None:
    """The G samples of a prompt send the same prefix key and length; other groups another key."""
    sim = RolloutSimulation("request", "openhands", prompts=2, group=3, steps=1, engines=1, seed=3)
    sim.run_steps()
    keys = sorted(sim._prefix.values())
    assert [k for k, _ in keys] == ["g0"] * 3 + ["g1"] * 3
    assert len({n for k, n in keys if k == "g0"}) == 1
    assert all(n > SETTINGS["openhands"].family.system_tokens for _, n in keys)


def test_report_structure_and_ratios() -> None:
    with ThreadPoolExecutor(2) as pool:
        runs = {s: run(list(SETTINGS), [1], 1, 2, 1, s, "llama-3.1-8b-h100", pool) for s in (1, 2)}
    one = runs[1]
    for setting in SETTINGS:
        row = one[setting]["1x2"]
        assert {"request", "program", "thunderagent"} <= set(row)
        assert row["thunderagent"]["variant"].startswith("ta-")
        assert row["request"]["steps_per_min_vs_request"] == 1.0
        for f in row.values():
            assert f["completed"] == f["trajectories"] == 2
            assert set(f["accounting"]) == {"mean_trajectory", "critical", "engine_busy_frac",
                                            "recompute_prefill_s", "prefill_tokens"}
            assert 0 < f["accounting"]["engine_busy_frac"] <= 1
    summary = across_seeds(runs)
    cell = summary["openhands"]["1x2"]["program"]
    assert cell["trajectories_per_min_min"] <= cell["trajectories_per_min_mean"] <= cell["trajectories_per_min_max"]
    assert cell["completed_equals_launched"]
    assert len(target_lines(summary, across=True)) == 2

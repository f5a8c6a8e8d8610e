"""bench/evolve_real.py's code path on the real SmolLM2-135M (both tiers), one problem, a few
tokens: the arms run through the evolve engine, the ledger is priced at the tiers' CPU rates,
the shared call cache replays what the arms have in common, and the report's interval and
headline follow from the counts. The benchmark itself is not part of the suite."""

from __future__ import annotations

import math

import pytest

from bench import evolve_real as er

TINY = "smollm2-135m"


def test_wilson_interval():
    lo, hi = er.wilson(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    lo, hi = er.wilson(0, 10)
    assert lo == 0.0 and round(hi, 4) == 0.2775
    lo, hi = er.wilson(10, 10)
    assert round(lo, 4) == 0.7225 and hi == 1.0
    with pytest.raises(ValueError):
        er.wilson(0, 0)
    with pytest.raises(ValueError):
        er.wilson(3, 2)


def test_arm_specs_sweep_and_prices():
    arms = er.arm_specs("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", [25, 50.5], max_tokens=64, temperature=0.7)
    assert list(arms) == ["single-strong", "single-cheap", "routed-p25", "routed-p50.5"]
    models, p = arms["routed-p25"]
    assert p == 25 and [m["name"] for m in models] == ["strong", "cheap"]
    assert models[0]["price_out"] > models[1]["price_out"]  # the strong tier sorts first
    assert models[1]["prompt_logprobs"] and not models[0]["prompt_logprobs"]  # the cheap tier scores


@pytest.mark.slow
async def test_one_problem_all_arms_on_smollm2():
    from scheduler.local import LocalEngine, load_model

    engine = LocalEngine(load_model(TINY))
    try:
        result = await er.run(strong=TINY, cheap=TINY, problems=1, seeds=[0], percentiles=[50.0], population=3, k=2,
                              groups=None, loops=2, lite_fraction=0.5, max_tokens=8, temperature=0.7, top_k=5,
                              engines={TINY: engine})
    finally:
        await engine.close()
    arms = result["arms"]
    assert list(arms) == ["single-strong", "single-cheap", "routed-p50"]
    price_in, price_out = er.PRICES[TINY]
    for row in arms.values():
        assert row["n"] == 1 and row["accuracy"] in (0.0, 1.0)
        assert row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
    single = arms["single-strong"]
    usage = single["per_model"]["strong"]
    # loop 0: 3 candidates, loop 1: 3 groups; no scoring without routing
    assert usage["calls"] == 6 and usage["scoring_calls"] == 0 and single["scoring_cost_share"] == 0
    assert single["cost_s_per_run"] == pytest.approx(
        (usage["input_tokens"] * price_in + usage["output_tokens"] * price_out) / 1e6, abs=0.01)
    routed = arms["routed-p50"]
    # loop 0 on strong (3 calls) and each written candidate scored once by cheap, plus the prefix count
    assert routed["per_model"]["cheap"]["scoring_calls"] == 3 + 1
    assert 0 < routed["scoring_cost_share"] < 1
    # three groups of two out of three candidates: distinct fitness values, the most confident one
    # above the median goes to cheap, where lite takes it (max(1, floor(0.5 x 1)))
    assert sum(routed["tier_calls"].values()) == 3 + 3 and routed["tier_calls"].get("lite", 0) == 1
    # the routed arm's loop 0 is single-strong's: replayed from the call cache, not computed again
    assert result["call_cache"]["replayed"] >= 3
    assert result["engine_busy_s"][TINY] > 0
    (head,) = result["headline"]
    assert head["arm"] == "routed-p50" and head["strong_ci95"] == single["ci95"]
    ratio = single["cost_s_per_run"] / routed["cost_s_per_run"]
    assert math.isclose(head["cost_strong_over_routed"], round(ratio, 3), abs_tol=0.01)
    assert head["meets_target"] == (head["within_strong_interval"] and ratio >= 2)

"""bench/evolve.py's own logic, without the service: the arms' specs, the bootstrap interval,
the per-arm summary, and what its simulated models are on the bundled problems. The benchmark
itself (the service and simulators) is not part of the suite."""

from __future__ import annotations

import pytest

from bench import evolve as be
from evolve.data import gsm8k_test


def test_arms_and_their_specs():
    problems = gsm8k_test(2)
    assert be.arm_models("single-strong") == (["strong"], None)
    assert be.arm_models("routed-p25") == (["strong", "weak"], 25.0)
    spec = be.evolve_spec(problems, be.MODELS, "routed-p75", loops=3, seed=2)
    assert spec["percentiles"] == [75.0] and spec["lite_fraction"] == be.LITE and spec["seed"] == 9
    assert [(m["name"], m["prompt_logprobs"]) for m in spec["models"]] == [("strong", False), ("weak", True)]
    single = be.evolve_spec(problems, be.MODELS, "single-weak", loops=3, seed=0)
    assert single["percentiles"] is None and single["lite_fraction"] == 0 and len(single["models"]) == 1
    script = be.script_spec(be.MODELS["weak"], problems, seed=4)
    assert script["confidence_from"] == "belief" and script["difficulty_sd"] == 1.5 and "price_in" not in script


def test_bootstrap_interval():
    assert be.bootstrap([1.0] * 10) == (1.0, 1.0)
    lo, hi = be.bootstrap([0.0, 1.0] * 15)
    assert lo < 0.5 < hi and hi - lo < 0.5
    assert be.bootstrap([0.0, 1.0] * 15) == (lo, hi)  # deterministic


def test_summary_pools_seeds_per_problem():
    def run(correct: list[bool], cost: float, scoring: float = 0.0) -> dict:
        return {"correct": correct, "cost_usd": cost, "scoring_cost_usd": scoring, "tier_calls": {"strong": 4},
                "calls": {"strong": {"generate": 4, "score": 0}}, "overhead_ratio": 0.1, "scoring_ratio": None,
                "run_wall_s": 1.0, "service_cpu_ms_per_call": 2.0}

    runs = {0: {"single-strong": run([True, True, False, True], 1.0), "routed-p0": run([True, False, False, True], 0.25,
                                                                                       0.01)},
            1: {"single-strong": run([True, True, True, True], 1.0), "routed-p0": run([True, False, True, True], 0.25,
                                                                                      0.01)}}
    out = be.summarize(["single-strong", "routed-p0"], runs)
    assert out["single-strong"]["accuracy"] == pytest.approx(7 / 8)
    assert out["routed-p0"]["accuracy"] == pytest.approx(5 / 8)
    assert out["routed-p0"]["cost_ratio_vs_single_strong"] == 4.0
    assert out["routed-p0"]["accuracy_minus_single_strong"] == pytest.approx(-0.25)
    lo, hi = out["routed-p0"]["accuracy_minus_single_strong_ci95"]
    assert lo <= -0.25 <= hi
    assert out["routed-p0"]["scoring_cost_share"] == pytest.approx(0.04)


def test_the_simulated_models_are_what_the_benchmark_says():
    sig = be.signal(gsm8k_test(60), be.MODELS)
    assert sig["strong"]["mean_p_right"] > sig["weak"]["mean_p_right"] + 0.2
    assert sig["strong"]["majority_of_8_right"] < 1.0  # the vote no longer saturates
    assert sig["weak"]["majority_of_8_right"] < sig["strong"]["majority_of_8_right"]
    assert 0.55 < sig["scorer_auroc"] < 0.95  # confidence informs, it does not know the truth
    easy = be.signal(gsm8k_test(60), be.EASY)  # the original models: confidence from the truth
    assert easy["scorer_auroc"] > 0.9 > sig["scorer_auroc"]

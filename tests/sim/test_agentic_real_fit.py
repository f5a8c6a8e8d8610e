"""The pure parts of bench/agentic_real.py: the cost-model fit from measured points, the trace
scaling the real run and the simulator share, and the ratio/gap arithmetic of its report.

The fit must recover a known model from points it generated (so a fitted model predicts what was
measured), never come out with a negative term from noisy points, and the scaled traces must keep
the bounds the real run relies on (outputs the server can write quickly, tools as short sleeps,
the last turn an answer)."""

from __future__ import annotations

import random

import pytest

from bench.agentic_real import (
    DecodePoint, PrefillPoint, Scale, ScaledFamily, fit_cost_model, gap, in_run_decode, model_error, nonneg_lstsq,
    ratios, run_sim,
)
from scheduler.sim.cost import CostModel, preset
from scheduler.sim.workloads import FAMILIES

TRUE = CostModel(name="true", description="", prefill_overhead_s=0.03, prefill_per_token_s=2e-3,
                 prefill_attn_per_pair_s=4e-7, decode_base_s=0.05, decode_per_seq_s=7e-3,
                 decode_per_context_token_s=2e-6, kv_capacity_tokens=3072, max_running_requests=32,
                 chunked_prefill_size=8192, context_length=8192)


def points(cost: CostModel, noise: float = 0.0, seed: int = 0) -> tuple[list[PrefillPoint], list[DecodePoint]]:
    rng = random.Random(seed)

    def jitter(x: float) -> float:
        return x * (1 + rng.uniform(-noise, noise))

    prefill = [PrefillPoint(n, jitter(cost.prefill_time([(n, 0)]))) for n in (32, 128, 256, 512, 1024)]
    decode = [DecodePoint(b, ctx, jitter(cost.decode_step_time(b, ctx)))
              for b, ctx in ((1, 44), (2, 88), (4, 176), (8, 352), (1, 780))]
    return prefill, decode


def fit(prefill: list[PrefillPoint], decode: list[DecodePoint]) -> CostModel:
    return fit_cost_model(prefill, decode, name="fit", kv_capacity_tokens=3072, max_running_requests=32,
                          chunked_prefill_size=8192, context_length=8192)


def test_the_fit_recovers_the_model_that_made_the_points() -> None:
    got = fit(*points(TRUE))
    for name in ("prefill_overhead_s", "prefill_per_token_s", "prefill_attn_per_pair_s", "decode_base_s",
                 "decode_per_seq_s", "decode_per_context_token_s"):
        assert getattr(got, name) == pytest.approx(getattr(TRUE, name), rel=1e-6), name
    assert model_error(got, *points(TRUE)) == {"prefill_mean_rel_error": 0.0, "decode_mean_rel_error": 0.0}
    assert got.kv_capacity_tokens == 3072


def test_noisy_points_give_no_negative_term_and_a_close_fit() -> None:
    flat = CostModel(**{**TRUE.__dict__, "prefill_attn_per_pair_s": 0.0, "decode_per_context_token_s": 0.0})
    for seed in range(20):
        got = fit(*points(flat, noise=0.05, seed=seed))
        assert min(got.prefill_overhead_s, got.prefill_per_token_s, got.prefill_attn_per_pair_s, got.decode_base_s,
                   got.decode_per_seq_s, got.decode_per_context_token_s) >= 0
        assert got.prefill_time([(500, 0)]) == pytest.approx(flat.prefill_time([(500, 0)]), rel=0.1)
        assert got.decode_step_time(6, 300) == pytest.approx(flat.decode_step_time(6, 300), rel=0.1)


def test_nonneg_lstsq_drops_the_negative_term() -> None:
    # y = 2 + 3x exactly, plus a third column that an unconstrained fit would use with a negative sign
    rows = [[1.0, x, x * x] for x in (1.0, 2.0, 3.0, 4.0)]
    ys = [2 + 3 * x - 0.1 * x * x for x in (1.0, 2.0, 3.0, 4.0)]
    coef = nonneg_lstsq(rows, ys)
    assert coef[2] == 0.0 and coef[0] > 0 and coef[1] > 0


def test_the_fit_needs_two_points_of_each() -> None:
    p, d = points(TRUE)
    with pytest.raises(ValueError):
        fit(p[:1], d)


def test_scaled_traces_keep_their_bounds_and_end_in_an_answer() -> None:
    scale = Scale()
    fam = ScaledFamily(FAMILIES["coding"], scale)
    for i in range(40):
        base, t = FAMILIES["coding"].program(100, i), fam.program(100, i)
        assert t == fam.program(100, i)  # deterministic: every policy runs the same programs
        assert 1 <= len(t.turns) <= scale.max_turns and len(t.turns) == min(len(base.turns), scale.max_turns)
        assert t.turns[-1].tool is None and all(u.tool is not None for u in t.turns[:-1])
        for u, b in zip(t.turns[:-1], base.turns, strict=False):
            assert 16 <= u.output_tokens <= 64
            assert 0.5 <= u.tool_s <= 5.0 and u.tool == b.tool
            assert u.result_tokens == max(1, round(b.result_tokens / 16))
        assert t.task_tokens == max(1, round(base.task_tokens / 16))
    assert fam.system_tokens == 125 and fam.sandbox_ready_s == 0.0


def test_the_simulator_runs_the_scaled_traces_on_a_fitted_model() -> None:
    fam = ScaledFamily(FAMILIES["coding"], Scale(max_turns=3))
    cost = fit(*points(TRUE))
    got = run_sim("program", fam, cost, programs=4, seed=100, window_s=30, finish_s=30, start_spread_s=2,
                  max_tokens=64, policy_options={})
    assert got["steps"] > 0 and got["prompt_tokens"] > 0
    assert got["prefilled_tokens"] == got["prompt_tokens"] - got["cached_tokens"]


def test_ratios_and_gap() -> None:
    measured = {"request": {"steps_per_min": 50.0, "p95_completion_s": 100.0},
                "thunderagent": {"steps_per_min": 80.0, "p95_completion_s": 80.0},
                "program": {"steps_per_min": 100.0, "p95_completion_s": 60.0}}
    predicted = {k: {**v, "steps_per_min": v["steps_per_min"] * (1.1 if k == "program" else 1.0)}
                 for k, v in measured.items()}
    assert ratios(measured) == {"program/request": 2.0, "program/request_p95": 0.6,
                                "program/thunderagent": 1.25, "program/thunderagent_p95": 0.75}
    g = gap(measured, predicted)
    assert g["program/request"] == pytest.approx(0.1) and g["program/thunderagent"] == pytest.approx(0.1)
    assert g["request_steps_per_min"] == 0.0 and g["program_steps_per_min"] == pytest.approx(0.1)


def test_the_preset_is_a_cost_model_the_error_measure_accepts() -> None:
    err = model_error(preset("smollm2-135m-cpu"), *points(TRUE))
    assert err["prefill_mean_rel_error"] > 0 and err["decode_mean_rel_error"] > 0


def test_in_run_decode_reads_sglangs_decode_lines() -> None:
    lines = [
        "[2026-12-04 23:26:51] Decode batch, #running-req: 5, #token: 826, token usage: 0.40, cpu graph: False, "
        "gen throughput (token/s): 16.25, #queue-req: 0",
        "[2026-12-04 23:26:53] Prefill batch, #new-seq: 2, #new-token: 122, #cached-token: 472, token usage: 0.50",
        "[2026-12-04 23:26:56] Decode batch, #running-req: 1, #token: 208, token usage: 0.10, cpu graph: False, "
        "gen throughput (token/s): 27.96, #queue-req: 0",
    ]
    got = in_run_decode(lines, TRUE)
    assert got["decode_log_lines"] == 2 and got["mean_batch"] == 3.0
    assert got["measured_tok_s"] == pytest.approx((16.25 + 27.96) / 2, abs=0.01)
    want = (5 / TRUE.decode_step_time(5, 826) + 1 / TRUE.decode_step_time(1, 208)) / 2
    assert got["model_tok_s"] == pytest.approx(want, abs=0.01)
    assert got["prefill_forwards"] == 1 and got["prefill_new_tokens"] == 122
    assert got["model_prefill_s"] == pytest.approx(TRUE.prefill_time([(122, 236)]), abs=0.05)
    only_prefill = in_run_decode(lines[1:2], TRUE)
    assert only_prefill["decode_log_lines"] == 0 and only_prefill["measured_tok_s"] is None

"""The benchmark's workload suite (``scheduler/sim/workloads.py``): every family deterministic per
seed and shaped as its docstring says; ``bench/agentic.py`` reports the best ThunderAgent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from scheduler.sim.cost import preset
from scheduler.sim.workloads import (
    CODING, FAMILIES, FAST_TOOLS, HEAVY_TAIL, LONG_TOOLS, MEMORY, MIX, STOCHASTIC, ProgramTrace,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from bench import agentic as bench  # noqa: E402


def tool_times(family: object, n: int = 400, seed: int = 0) -> list[float]:
    return sorted(t.tool_s for i in range(n) for t in family.program(seed, i).turns if t.tool)  # type: ignore[attr-defined]


def q(values: list[float], x: float) -> float:
    return values[min(len(values) - 1, int(len(values) * x))]


def contexts(family: object, n: int = 400) -> list[int]:
    return sorted(family.system_tokens + p.task_tokens + sum(t.output_tokens + t.result_tokens for t in p.turns)  # type: ignore[attr-defined]
                  for p in (family.program(0, i) for i in range(n)))  # type: ignore[attr-defined]


def test_at_least_six_families_and_a_mix():
    assert {"coding", "stochastic", "fast_tools", "heavy_tail", "long_tools", "memory", "mix"} <= set(FAMILIES)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_is_deterministic_per_seed_and_ends_with_an_answer(name):
    f = FAMILIES[name]
    a = [f.program(7, i) for i in range(20)]
    assert a == [f.program(7, i) for i in range(20)]
    assert a != [f.program(8, i) for i in range(20)]
    it = f.programs(7)
    assert [next(it) for _ in range(5)] == a[:5]
    for p in a:
        assert isinstance(p, ProgramTrace) and p.turns[-1].tool is None
        assert all(t.tool is not None and t.tool_s > 0 for t in p.turns[:-1])


def test_heavy_tailed_tools_are_mostly_short_with_a_few_running_many_minutes():
    ts = tool_times(HEAVY_TAIL)
    assert 1.5 <= q(ts, 0.5) <= 6.0           # most calls return in seconds
    assert 300 <= q(ts, 0.99) <= 1_200         # p99: five to twenty minutes
    assert 0.01 <= sum(t > 300 for t in ts) / len(ts) <= 0.05  # a few run past five minutes
    assert max(ts) <= 3_600                    # capped at an hour
    stoch = tool_times(STOCHASTIC)
    assert q(ts, 0.99) > 3 * q(stoch, 0.99)    # a heavier tail than ``stochastic``


def test_long_tools_are_long_and_stable():
    ts = tool_times(LONG_TOOLS)
    assert 30.0 <= ts[0] and ts[-1] <= 60.0
    assert 43 <= sum(ts) / len(ts) <= 47


def test_fast_tools_return_in_about_a_second():
    ts = tool_times(FAST_TOOLS)
    assert q(ts, 0.5) < 0.5 and q(ts, 0.99) < 3.0
    assert q(tool_times(CODING), 0.99) > 3 * q(ts, 0.99)


def test_memory_pressure_long_outputs_large_results_and_a_small_pool():
    assert MEMORY.kv_capacity_tokens is not None
    assert MEMORY.kv_capacity_tokens < preset("llama-3.1-70b-h100-tp4").kv_capacity_tokens
    turns = [t for i in range(300) for t in MEMORY.program(0, i).turns]
    coding = [t for i in range(300) for t in CODING.program(0, i).turns]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean([t.output_tokens for t in turns]) > 4 * mean([t.output_tokens for t in coding])
    assert mean([t.result_tokens for t in turns if t.tool]) > 4 * mean([t.result_tokens for t in coding if t.tool])
    ctx = contexts(MEMORY)
    # a median program needs a sixth of the pool: a few dozen overflow it
    assert MEMORY.kv_capacity_tokens / 8 < q(ctx, 0.5) < MEMORY.kv_capacity_tokens / 3


def test_mix_draws_whole_programs_from_its_families_in_proportion():
    drawn = [MIX.family_of(0, i).name for i in range(2000)]
    for family, weight in MIX.parts:
        assert abs(drawn.count(family.name) / len(drawn) - weight) < 0.04
        i = drawn.index(family.name)
        assert MIX.program(0, i) == family.program(0, i)
    assert MIX.sandbox_bytes == max(f.sandbox_bytes for f, _ in MIX.parts)


def test_the_original_two_families_are_unchanged():
    """The suite's refactor (``ToolShape.draw``) must not move the figures already published."""
    import math
    import random
    rng = random.Random("stochastic/0/0")  # replay the generator's draws by hand for the first tool
    rng.lognormvariate(math.log(STOCHASTIC.turns_median), STOCHASTIC.turns_sigma)
    rng.randint(*STOCHASTIC.task_tokens)
    rng.lognormvariate(math.log(STOCHASTIC.output_median), STOCHASTIC.output_sigma)
    shape = rng.choices(STOCHASTIC.tools, [t.weight for t in STOCHASTIC.tools])[0]
    rng.lognormvariate(math.log(STOCHASTIC.result_median), STOCHASTIC.result_sigma)
    first = STOCHASTIC.program(0, 0).turns[0]
    assert first.tool == shape.name
    assert first.tool_s == rng.lognormvariate(math.log(shape.median_s), shape.sigma)


def test_suite_cells_quick_and_full():
    quick = bench.suite(True, None, None, None, "p1", "p8")
    assert [(c.family, c.engines, c.programs) for c in quick] == bench.QUICK_CELLS
    assert {c.preset for c in quick if c.engines == 1} == {"p1"}
    assert all(c.preset == "p8" for c in quick if c.engines > 1)
    full = bench.suite(False, None, None, None, "p1", "p8")
    assert {c.family for c in full} == set(FAMILIES)
    assert {(c.engines, c.programs) for c in full if c.family == "coding"} == \
        {(1, 48), (1, 96), (1, 160), (4, 192), (4, 384), (8, 384), (8, 768)}
    assert [c.label for c in bench.suite(False, ["mix"], [4], [10], "p1", "p8")] == ["4x40"]
    with pytest.raises(SystemExit, match="unknown families"):
        bench.suite(False, ["nope"], None, None, "p1", "p8")


def test_best_thunderagent_is_the_variant_with_most_steps_and_ratios_are_against_it():
    row = {"request": {"steps_per_min": 50.0, "p95_completion_s": 900.0},
           "program": {"steps_per_min": 120.0, "p95_completion_s": 500.0}}
    for i, name in enumerate(bench.TA_VARIANTS):
        row[name] = {"steps_per_min": 100.0 + i, "p95_completion_s": 600.0 - i}
    best = list(bench.TA_VARIANTS)[-1]
    out = bench.with_ratios(row)
    assert out["thunderagent"]["variant"] == best
    assert out["thunderagent"]["steps_per_min"] == 100.0 + len(bench.TA_VARIANTS) - 1
    assert out["program"]["steps_per_min_vs_thunderagent"] == round(120.0 / out["thunderagent"]["steps_per_min"], 3)
    assert out["program"]["steps_per_min_vs_request"] == 2.4


def test_bench_run_on_a_tiny_cell_reports_every_variant_and_the_best():
    cells = [bench.Cell("fast_tools", 1, 12, "llama-3.1-70b-h100-tp4")]
    with ThreadPoolExecutor(1) as pool:
        out = bench.run(cells, 100, 120.0, False, pool)
    row = out["fast_tools"]["12"]
    assert set(bench.TA_VARIANTS) | {"request", "program", "thunderagent"} <= set(row)
    ta = row["thunderagent"]
    assert ta["variant"] in bench.TA_VARIANTS
    assert ta["steps_per_min"] == max(row[k]["steps_per_min"] for k in bench.TA_VARIANTS)
    assert row["program"]["steps_per_min_vs_thunderagent"] == round(
        row["program"]["steps_per_min"] / ta["steps_per_min"], 3)


@pytest.mark.slow
def test_bench_quick_json_yields_the_best_of_field():
    out = subprocess.run([sys.executable, "bench/agentic.py", "--quick", "--json", "--workers", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout)
    for family, engines, n in bench.QUICK_CELLS:
        row = result[family][str(n) if engines == 1 else f"{engines}x{n}"]
        assert row["thunderagent"]["variant"] in bench.TA_VARIANTS
        assert all(k in row for k in bench.TA_VARIANTS)
        assert "p95_completion_s" in row["thunderagent"] and "steps_per_min_vs_thunderagent" in row["program"]

"""Cost model sanity: the shapes a scheduler relies on."""

from __future__ import annotations

import pytest

from scheduler.sim.cost import PRESETS, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_cost_shapes(name: str) -> None:
    c = preset(name)
    assert c.prefill_time([(1000, 0)]) > c.prefill_time([(100, 0)]) > c.prefill_overhead_s
    assert c.decode_step_time(64, 64 * 1000) > c.decode_step_time(8, 8 * 1000) > c.decode_step_time(1, 1000)
    # a cache hit is cheaper than recomputing: prefill 100 new tokens after 4000 cached < 4100 new
    assert c.prefill_time([(100, 4000)]) < c.prefill_time([(4100, 0)])
    steps = [c.decode_step_time(4, 4000 + 4 * i) for i in range(10)]
    assert c.decode_steps_time(4, 4000, 10) == pytest.approx(sum(steps))


def test_h100_8b_figures_are_in_published_range() -> None:
    c = preset("llama-3.1-8b-h100")
    assert 0.004 < c.decode_step_time(1, 1000) < 0.008  # NIM ITL 4.6 ms (TRT-LLM), bandwidth bound 4.8-6 ms
    assert 5_000 < 1000 / (c.prefill_time([(1000, 0)]) - c.prefill_overhead_s) < 40_000  # tokens/s


def test_unknown_preset_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="llama-3.1-8b-h100"):
        preset("nope")

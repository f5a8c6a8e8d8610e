"""The pure parts of evolve: percentiles, routing (thresholds, tiers, lite), the ledger, answer
extraction, operators and the confidence arithmetic, on hand-computed examples."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from evolve.extract import boxed, choice, integer
from evolve.fitness import candidate_confidence, distinct_answers, tail_tokens, token_confidence
from evolve.ledger import Ledger, Price
from evolve.operators import (
    default_operators, lite_majority, majority_answer, select_softmax, select_uniform, update_accumulate,
    update_replace, vote_shares,
)
from evolve.routing import LITE, default_percentiles, percentile, route
from evolve.spec import input_model
from scheduler.backends.base import TokenLogprob, Usage

Spec = input_model(default_operators())


def test_percentile_is_linear_interpolation_like_numpy():
    values = [3.0, 1.0, 4.0, 1.5, 5.0]
    np = pytest.importorskip("numpy")
    for q in (0, 10, 25, 50, 62.5, 90, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([7.0], 30) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_two_models_split_at_the_percentile_least_confident_to_the_expensive_one():
    fitness = [0.5, 2.0, 1.0, 3.0, 0.1, 2.5, 1.5, 0.9, 2.2, 1.8]
    r = route(fitness, 2, [30])
    # 30th percentile of the sorted values [0.1 0.5 0.9 1.0 1.5 1.8 2.0 2.2 2.5 3.0]: pos 2.7 -> 0.9 + 0.7*0.1
    assert r.thresholds == [pytest.approx(0.97)]
    assert r.tiers == [0, 1, 1, 1, 0, 1, 1, 0, 1, 1]
    assert r.counts(2) == {0: 3, 1: 7, LITE: 0}


def test_three_models_and_lite_take_the_most_confident_of_the_cheapest():
    fitness = [float(v) for v in range(10)]  # group g has fitness g
    r = route(fitness, 3, [20, 60], lite_fraction=0.5)
    assert r.thresholds == [pytest.approx(1.8), pytest.approx(5.4)]
    # below 1.8: groups 0, 1 -> model 0; [1.8, 5.4): 2..5 -> model 1; >= 5.4: 6..9 -> cheapest, top half lite
    assert r.tiers == [0, 0, 1, 1, 1, 1, 2, 2, LITE, LITE]


def test_lite_rounds_down_and_breaks_ties_by_group_order():
    r = route([1.0, 1.0, 1.0, 0.0], 1, [], lite_fraction=0.7)  # one model: every group is "cheapest"
    assert r.tiers == [LITE, LITE, 0, 0]  # floor(0.7 * 4) = 2: the first two of the equal best
    assert route([1.0] * 3, 1, [], lite_fraction=1.0).tiers == [LITE] * 3


def test_equal_fitness_goes_to_the_expensive_tier_and_bad_arguments_are_refused():
    # at the threshold goes to the more expensive tier, as in the reference (test_routing_reference.py)
    assert route([2.0, 2.0, 2.0], 2, [50]).tiers == [0, 0, 0]
    with pytest.raises(ValueError):
        route([1.0], 3, [50])
    with pytest.raises(ValueError):
        route([1.0], 2, [101])
    assert route([1.0], 3, [60, 20]).thresholds == [1.0, 1.0]  # sorted, not refused
    assert default_percentiles(2) == [50.0] and default_percentiles(4) == [25.0, 50.0, 75.0]


def test_diversity_routes_consensus_to_the_cheap_model():
    groups = [[{"answer": "3"}] * 4, [{"answer": "3"}, {"answer": "4"}, {"answer": None}, {"answer": "3"}],
              [{"answer": str(i)} for i in range(4)]]
    fitness = [-float(distinct_answers(g)) for g in groups]
    assert fitness == [-1.0, -3.0, -4.0]
    # median -3.0: consensus (-1) above it goes cheap; the group at it (a tie) and below it, expensive
    assert route(fitness, 2, [50]).tiers == [1, 0, 0]


def test_ledger_sums_tokens_and_money_per_model_and_in_total():
    a, b = Ledger(), Ledger()
    strong, weak = Price(3.0, 15.0), Price(0.1, 0.4)
    a.generation("strong", Usage(prompt_tokens=100, completion_tokens=50, cached_tokens=20), strong)
    a.scoring("weak", Usage(prompt_tokens=400, completion_tokens=1), weak)
    a.routed("strong", 1)
    b.generation("weak", Usage(prompt_tokens=200, completion_tokens=80), weak)
    b.routed("weak")
    b.routed("lite", 3)
    assert a.cost_usd == pytest.approx((100 * 3 + 50 * 15 + 400 * 0.1 + 1 * 0.4) / 1e6)
    total = Ledger.total([a, b])
    assert total.models["weak"].input_tokens == 200 and total.models["weak"].scoring_tokens == 400
    assert total.models["strong"].cached_tokens == 20
    assert total.tokens() == {"input": 300, "output": 130, "scoring": 400}
    assert total.tier_calls == {"strong": 1, "weak": 1, "lite": 3} and total.lite == 3
    assert total.cost_usd == pytest.approx(a.cost_usd + b.cost_usd)
    again = Ledger.from_dict(total.to_dict())
    assert again.to_dict() == total.to_dict()


@pytest.mark.parametrize("text,expected", [
    ("so 3 + 4 = 7. The answer is \\boxed{7}.", "7"),
    ("Janet makes $18 a day.\n#### 18", "18"),
    ("total = 1,234.50 dollars", "1234.5"),
    ("first \\boxed{2} then corrected: \\boxed{-3}", "-3"),
    ("The answer is 42.", "42"),
    ("no number here", None),
])
def test_integer_extraction(text, expected):
    assert integer(text) == expected


def test_boxed_and_choice_extraction():
    assert boxed("x = \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert boxed("put it in \\boxed{} ... \\boxed{ 12.0 }") == "12"
    assert boxed("nothing") is None
    assert choice("Thinking... the answer is (C).") == "C"
    assert choice("\\boxed{b}") == "B"
    assert choice("Option: D") == "D"


def test_uniform_selection_is_seeded_and_never_repeats_inside_a_group():
    pop = [{"answer": str(i)} for i in range(8)]
    a = select_uniform(pop, 5, 4, random.Random("s"))
    assert a == select_uniform(pop, 5, 4, random.Random("s"))
    assert all(len(set(g)) == 4 for g in a) and len(a) == 5


def test_softmax_selection_prefers_the_majority_as_temperature_falls():
    pop = [{"answer": "1"}] * 6 + [{"answer": "2"}, {"answer": "3"}]
    assert vote_shares(pop)[:1] == [0.75] and vote_shares(pop)[-1] == 0.125

    def majority_picks(temp: float) -> int:
        groups = select_softmax(pop, 400, 1, random.Random(1), temp)
        return sum(1 for g in groups if g[0] < 6)

    assert majority_picks(0.05) > 395
    assert 250 < majority_picks(100.0) < 350  # nearly uniform: 6/8 of 400
    assert all(len(set(g)) == 3 for g in select_softmax(pop, 20, 3, random.Random(2), 0.01))


def test_lite_majority_update_and_final_majority():
    group = [{"answer": "5"}, {"answer": "6"}, {"answer": "6"}, {"answer": None}]
    assert lite_majority(group, random.Random()) == 1
    assert majority_answer(group) == ("6", 1, {"5": 1, "6": 2})
    assert majority_answer([{"answer": "1"}, {"answer": "2"}])[0] == "1"  # tie: first seen
    assert update_replace([1, 2], [3]) == [3] and update_accumulate([1, 2], [3]) == [1, 2, 3]


def _lp(token: str, top: list[float]) -> TokenLogprob:
    return TokenLogprob(token=token, logprob=top[0], top=[(f"t{i}", v) for i, v in enumerate(top)])


def test_confidence_is_the_negated_mean_top_k_logprob_over_the_candidate_tokens_only():
    prefix = [_lp("<|im_start|>", [-9.0, -9.0]), _lp("Solve", [-5.0, -7.0])]
    cand = [_lp(" The", [-0.1, -3.0, -5.0]), _lp(" answer", [-0.2, -4.0, -6.0]), _lp(" 7", [-1.0, -1.2, -2.0])]
    entries = prefix + cand
    assert tail_tokens(entries, " The answer 7") == cand
    assert token_confidence(cand[0], 3) == pytest.approx(8.1 / 3)
    assert token_confidence(cand[0], 2) == pytest.approx(3.1 / 2)
    expected = (8.1 / 3 + 10.2 / 3 + 4.2 / 3) / 3
    assert candidate_confidence(entries, " The answer 7", k=20) == pytest.approx(expected)


def test_spec_is_checked_at_submission():
    base = {"problems": [{"question": "1+1?"}],
            "models": [{"name": "big", "price_out": 10}, {"name": "small", "prompt_logprobs": True}]}
    s = Spec(**base)
    assert [m.name for m in s.ordered_models()] == ["big", "small"] and s.scoring_model().name == "small"
    bad = [
        {"fitness": "vibes"}, {"selection": "tournament"}, {"final": "oracle"}, {"answer_format": "poem"},
        {"percentiles": [10, 20]}, {"percentiles": [120]}, {"k": 40, "population": 8},
        {"models": [{"name": "a"}, {"name": "a"}]}, {"models": [{"name": "a"}, {"name": "b"}]},
        {"scorer": "big"}, {"models": [{"name": "a", "chat_template": "{% if %}"}]},
    ]
    for patch in bad:
        with pytest.raises(ValidationError):
            Spec(**(base | patch))
    # one model and no lite needs no fitness, so no scorer either
    assert Spec(problems=base["problems"], models=[{"name": "only"}]).scoring_model() is None
    assert Spec(**(base | {"models": [{"name": "a"}, {"name": "b"}], "fitness": "diversity"}))


def test_operators_plug_in_by_name_without_global_state():
    from orchestrator.workflows import WorkflowRegistry
    from evolve.workflow import register

    def first_k(population, groups, k, rng, temperature):
        return [list(range(k)) for _ in range(groups)]

    ops = default_operators()
    ops.add("selection", "first", first_k)
    base = {"problems": [{"question": "q"}], "models": [{"name": "m"}], "selection": "first"}
    assert input_model(ops)(**base).selection == "first"
    with pytest.raises(ValidationError):
        Spec(**base)  # the default registry does not know it
    assert ops.get("selection", "first") is first_k and "first" not in default_operators().names("selection")
    registry = WorkflowRegistry()
    register(registry, ops, name="evolve-custom")
    assert registry.get("evolve-custom").input_model(**base).selection == "first"
    with pytest.raises(ValueError):
        ops.add("mutation", "x", first_k)

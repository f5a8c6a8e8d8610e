"""Routing parity with the Squeeze-Evolve reference implementation.

Every case gives ``evolve.routing.route`` the inputs the reference's
``compute_thresholds(fitnesses, percentiles)`` and ``assign_routes(fitnesses, thresholds,
n_models, lite_fraction)`` (``squeeze_evolve/algorithm/operators.py``, github.com/squeeze-evolve/
squeeze-evolve) would get, and asserts the reference's outputs, written out literally: the
thresholds, and the routes in the reference's own names. The reference numbers its models the
other way round (``model_0`` is the cheapest, ``model_{n-1}`` the most expensive; ours: 0 is the
most expensive), so ``as_ours`` renames them; it changes nothing else.
"""

from __future__ import annotations

import pytest

from evolve.routing import LITE, lite_count, route


def as_ours(reference_routes: list[str], n_models: int) -> list[int]:
    """The reference's ``model_j`` is our tier ``n_models - 1 - j``; ``lite`` is ``LITE``."""
    return [LITE if r == "lite" else n_models - 1 - int(r.removeprefix("model_")) for r in reference_routes]


def test_a_group_tied_with_the_threshold_goes_to_the_more_expensive_tier():
    # reference: compute_thresholds([2, 2, 2], [50]) == [2.0]; assign_routes(..., 2) sends f <= t to
    # model_1 (the expensive one) -> ['model_1', 'model_1', 'model_1']
    r = route([2.0, 2.0, 2.0], 2, [50])
    assert r.thresholds == [2.0]
    assert r.tiers == as_ours(["model_1", "model_1", "model_1"], 2) == [0, 0, 0]
    # median of [1, 2, 2, 3, 4] is 2.0: both 2.0 groups tie with it and go expensive with the 1.0 one
    r = route([1.0, 2.0, 3.0, 2.0, 4.0], 2, [50])
    assert r.thresholds == [2.0]
    assert r.tiers == as_ours(["model_1", "model_1", "model_0", "model_1", "model_0"], 2)


def test_ties_at_both_thresholds_of_three_models():
    # reference: percentiles [50, 20] sorted to [20, 50]; over [1, 1, 2, 2, 3, 3] the 20th percentile
    # is 1.0 and the 50th 2.0 -> ['model_2', 'model_2', 'model_1', 'model_1', 'model_0', 'model_0']
    r = route([1.0, 1.0, 2.0, 2.0, 3.0, 3.0], 3, [50, 20])
    assert r.thresholds == [1.0, 2.0]
    assert r.tiers == as_ours(["model_2", "model_2", "model_1", "model_1", "model_0", "model_0"], 3)
    assert r.tiers == [0, 0, 1, 1, 2, 2]


def test_any_positive_lite_fraction_sends_at_least_one_group_to_lite():
    # reference: threshold 1.5; model_0 (cheapest) holds groups 2 and 3; max(1, int(2 * 0.1)) = 1
    # of them, the most confident (3), goes lite -> ['model_1', 'model_1', 'model_0', 'lite']
    r = route([0.0, 1.0, 2.0, 3.0], 2, [50], lite_fraction=0.1)
    assert r.thresholds == [1.5]
    assert r.tiers == as_ours(["model_1", "model_1", "model_0", "lite"], 2) == [0, 0, 1, LITE]
    # one group at the cheapest model and lite 1.0 -> ['model_1', 'lite']
    assert route([1.0, 2.0], 2, [50], lite_fraction=1.0).tiers == as_ours(["model_1", "lite"], 2)
    # a fraction of 0 sends none, and nothing at the cheapest model means nothing to send
    assert lite_count(5, 0.0) == 0 and lite_count(0, 0.5) == 0 and lite_count(2, 0.1) == 1


def test_lite_ties_go_to_the_earlier_group():
    # reference, one model: no thresholds, all model_0; the stable descending sort keeps groups
    # 0, 1, 3 (fitness 5) in index order, max(1, int(4 * 0.5)) = 2 -> ['lite', 'lite', 'model_0', 'model_0']
    r = route([5.0, 5.0, 1.0, 5.0], 1, [], lite_fraction=0.5)
    assert r.thresholds == []
    assert r.tiers == as_ours(["lite", "lite", "model_0", "model_0"], 1)


def test_percentile_100_sends_everything_to_the_expensive_tier_and_0_nothing():
    # reference: p >= 100 -> max + 1 = 4.0; every group is at or below it -> all 'model_1'; no
    # model_0 group, so lite 0.5 has nothing to take
    r = route([0.5, 1.0, 3.0], 2, [100], lite_fraction=0.5)
    assert r.thresholds == [4.0]
    assert r.tiers == as_ours(["model_1", "model_1", "model_1"], 2) == [0, 0, 0]
    # reference: p <= 0 -> min - 1 = -0.5; no group is at or below it -> all 'model_0' (cheapest)
    r = route([0.5, 1.0, 3.0], 2, [0])
    assert r.thresholds == [-0.5]
    assert r.tiers == as_ours(["model_0", "model_0", "model_0"], 2) == [1, 1, 1]
    # three models, [100, 0] sorted to [0, 100]: thresholds [0.0, 4.0], everyone in the middle
    r = route([3.0, 1.0, 2.0], 3, [100, 0], lite_fraction=0.5)
    assert r.thresholds == [0.0, 4.0]
    assert r.tiers == as_ours(["model_1", "model_1", "model_1"], 3) == [1, 1, 1]


def test_unsorted_percentiles_are_sorted_and_three_tiers_with_lite():
    # reference: [60, 20] sorted to [20, 60]: thresholds [1.8, 5.4] over 0..9; model_0 holds 6..9,
    # max(1, int(4 * 0.5)) = 2 most confident (9, 8) go lite
    r = route([float(v) for v in range(10)], 3, [60, 20], lite_fraction=0.5)
    assert r.thresholds == [pytest.approx(1.8), pytest.approx(5.4)]
    assert r.tiers == as_ours(["model_2", "model_2", "model_1", "model_1", "model_1", "model_1",
                               "model_0", "model_0", "lite", "lite"], 3)
    assert route([float(v) for v in range(10)], 3, [20, 60], lite_fraction=0.5).tiers == r.tiers


def test_interpolated_threshold_matches_numpy_percentile():
    # reference: np.percentile(f, 30) = 0.97 ->
    # ['model_1', 'model_0', 'model_0', 'model_0', 'model_1', 'model_0', 'model_0', 'model_1', 'model_0', 'model_0']
    f = [0.5, 2.0, 1.0, 3.0, 0.1, 2.5, 1.5, 0.9, 2.2, 1.8]
    r = route(f, 2, [30])
    assert r.thresholds == [pytest.approx(0.97)]
    assert r.tiers == as_ours(["model_1", "model_0", "model_0", "model_0", "model_1", "model_0", "model_0",
                               "model_1", "model_0", "model_0"], 2)


def test_the_one_documented_difference_floating_point_floor_of_the_lite_count():
    # reference: int(100 * 0.29) = int(28.999999999999996) = 28 lite groups; ours counts 29, the
    # share the user wrote (evolve/routing.py explains why)
    assert 100 * 0.29 < 29
    r = route([float(v) for v in range(100)], 1, [], lite_fraction=0.29)
    assert r.tiers.count(LITE) == lite_count(100, 0.29) == 29
    assert r.tiers[71:] == [LITE] * 29 and LITE not in r.tiers[:71]  # the 29 most confident
    # away from such products the two agree: int(4 * 0.7) = 2, int(10 * 0.3) = 3
    assert lite_count(4, 0.7) == 2 and lite_count(10, 0.3) == 3


def test_out_of_range_percentiles_are_refused_not_clamped():
    # the reference treats 120 as 100 and -5 as 0; ours refuses them (a typo more likely than intent)
    for bad in ([120], [-5]):
        with pytest.raises(ValueError, match=r"\[0, 100\]"):
            route([1.0, 2.0], 2, bad)

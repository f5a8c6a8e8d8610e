"""ThunderAgent's faithful variants (``ThunderAgentPolicy`` options), each on a small hand-built
scenario: what the code does where it differs from the paper (router.py, backend/state.py)."""

from __future__ import annotations

import pytest

from scheduler.core import (
    BackendView, Dispatch, Pause, PrepareSandbox, RequestArrived, RequestFinished, Resume, Scheduler, Status, Tick,
    make_policy,
)


def sched(*caps: int, **opts: object) -> Scheduler:
    return Scheduler("thunderagent", backends=[BackendView(f"b{i}", c) for i, c in enumerate(caps)], **opts)


def arrive(s: Scheduler, now: float, pid: str, tokens: int, rid: str) -> list:
    return s.handle(RequestArrived(now, pid, rid, tokens))


def dispatched(decisions: list) -> list[tuple[str, str]]:
    return [(d.program_id, d.backend) for d in decisions if isinstance(d, Dispatch)]


def two_backends_one_waiting(placement: str) -> tuple[Scheduler, list]:
    """b0 (10,000) holds a 6,000-token acting program, b1 (10,000) a 2,000-token one; a third
    program of 1,000 waits in the queue (it arrived while another waited) and is restored at
    the tick: best fit puts it on b0 (least room left), worst fit (the code) on b1."""
    s = sched(10_000, 10_000, acting_decay=False, placement=placement)
    assert dispatched(arrive(s, 0, "big", 6000, "big")) == [("big", "b0")]
    assert dispatched(arrive(s, 0, "small", 2000, "small")) == [("small", "b1")]  # fewest active tokens
    s.handle(RequestFinished(1, "big", 6000, 0, tool="bash"))
    s.handle(RequestFinished(1, "small", 2000, 0, tool="bash"))
    s.policy.s.waiting["placeholder"] = s.programs["big"]  # someone waits: new programs queue (fairness)
    out = arrive(s, 2, "new", 1000, "new")
    del s.policy.s.waiting["placeholder"]
    assert dispatched(out) == [] and s.programs["new"].status is Status.WAITING
    return s, s.handle(Tick(5))


def test_best_fit_places_on_the_fullest_backend_that_fits():
    _, out = two_backends_one_waiting("best")
    assert dispatched(out) == [("new", "b0")]


def test_worst_fit_places_on_the_emptiest_backend():
    _, out = two_backends_one_waiting("worst")
    assert dispatched(out) == [("new", "b1")]


def test_decay_paper_resume_and_none_weigh_acting_programs_where_the_code_says():
    for decay, check, resume in (("paper", 6100 / 8, 6100 / 8), ("resume", 6100, 6100 / 8), ("none", 6100, 6100)):
        s = sched(10_000, acting_decay=decay)
        arrive(s, 0, "a", 6000, "a")
        s.handle(RequestFinished(1, "a", 6000, 100, tool="sim"))
        p, b = s.programs["a"], s.backends["b0"]
        assert s.policy.footprint(b, 4) == pytest.approx(check + 100), decay  # the thrashing check
        assert s.policy.footprint(b, 4, for_resume=True) == pytest.approx(resume + 100), decay
        assert s.policy.cost(p, 1) == pytest.approx(6100)  # t = 0: full weight in every setting
    assert make_policy("thunderagent", acting_decay=False).decay == "none"
    assert make_policy("thunderagent", acting_decay=True).decay == "paper"


def test_decay_on_resume_only_restores_into_room_the_check_then_takes_back():
    """The code's flag: restore counts a long-idle acting program as nearly gone, the thrashing
    check right after counts it in full and pauses again; the paper counts it as gone in both."""
    outs = {}
    for decay in ("resume", "paper"):
        s = sched(10_000, acting_decay=decay)
        arrive(s, 0, "a", 7000, "a")
        s.handle(RequestFinished(1, "a", 7000, 0, tool="sim"))
        arrive(s, 1, "b", 1000, "b")
        s.handle(RequestFinished(2, "b", 1000, 0, tool="bash"))
        s.handle(Tick(3))  # the check happens at ticks 5 s apart
        s.policy.s.waiting["placeholder"] = s.programs["a"]
        arrive(s, 4, "c", 4000, "c")  # 7,000 + 1,000 + 4,000 > 10,000 in full
        del s.policy.s.waiting["placeholder"]
        outs[decay] = s.handle(Tick(20))
    assert ("c", "b0") in dispatched(outs["resume"]) and ("c", "b0") in dispatched(outs["paper"])
    # 12,300 counted in full: acting programs paused shortest first until it fits (b, then a)
    assert [d.program_id for d in outs["resume"] if isinstance(d, Pause)] == ["b", "a"]
    assert not any(isinstance(d, Pause) for d in outs["paper"])


def test_forced_resume_after_1800_s_regardless_of_capacity():
    s = sched(10_000, acting_decay=False, force_resume_s=1800.0)
    arrive(s, 0, "hog", 9500, "hog")  # holds the backend for ever (its tool never ends)
    s.handle(RequestFinished(1, "hog", 9500, 0, tool="train"))
    arrive(s, 10, "late", 2000, "late")  # does not fit: waits
    assert s.programs["late"].status is Status.WAITING
    out = []
    for t in range(15, 1810, 5):
        out += s.handle(Tick(float(t)))
    assert dispatched(out) == []  # 1,800 s not yet passed since its request began waiting
    out = s.handle(Tick(1811.0))
    assert dispatched(out) == [("late", "b0")] and s.policy.forced_resumes == 1
    # without the option it would wait for ever
    s2 = sched(10_000, acting_decay=False)
    arrive(s2, 0, "hog", 9500, "hog")
    s2.handle(RequestFinished(1, "hog", 9500, 0, tool="train"))
    arrive(s2, 10, "late", 2000, "late")
    assert all(not dispatched(s2.handle(Tick(float(t)))) for t in range(15, 4000, 5))


def test_forced_resume_goes_to_the_former_backend_or_for_a_new_program_the_one_with_fewest_programs():
    s = sched(10_000, 10_000, acting_decay=False, force_resume_s=100.0)
    for pid, tokens, where in (("x", 4000, "b0"), ("y", 8000, "b1"), ("z", 1000, "b0"), ("w", 1000, "b0")):
        assert dispatched(arrive(s, 0, pid, tokens, pid)) == [(pid, where)]  # fewest active tokens
    s.handle(RequestFinished(1, "x", 4000, 0, tool="bash"))
    s.pause(s.programs["x"])  # as a relieve would
    s.handle(RequestFinished(1, "z", 1000, 0, tool="bash"))
    assert dispatched(arrive(s, 1.5, "z", 7000, "z2")) == [("z", "b0")]  # b0 holds 8,200 now, b1 8,100
    assert dispatched(arrive(s, 2, "x", 4100, "x2")) == []  # paused: waits
    assert dispatched(arrive(s, 2, "n", 5000, "n")) == []  # someone waits: queued
    out = []
    for t in range(3, 102):
        out += s.handle(Tick(float(t)))
    assert dispatched(out) == []  # nothing fits anywhere
    out = s.handle(Tick(102.5))
    # x back where its KV was (b0 has 2 programs, b1 1); n, new, on the backend with fewest programs
    assert ("x", "b0") in dispatched(out) and ("n", "b1") in dispatched(out)
    assert s.policy.forced_resumes == 2


def test_character_estimates_replace_the_exact_count_until_the_answer():
    s = sched(100_000, acting_decay=False, token_estimate="chars", chars_per_token=(3.0, 3.0))
    arrive(s, 0, "a", 10_000, "a1")
    p = s.programs["a"]
    # the initial global ratio is 5 characters per token; this payload has 3: under-estimated
    assert s.policy.tokens(p) == 6000 and p.tokens == 10_000
    s.handle(RequestFinished(1, "a1", 10_000, 200, tool="bash"))
    assert s.policy.tokens(p) == 10_200  # the usage replaces the estimate
    assert s.policy.char_ratio == pytest.approx(3.0)  # the first sample is taken as is
    arrive(s, 2, "a", 10_700, "a2")
    assert s.policy.tokens(p) == 10_700  # learned: now right for this program
    exact = sched(100_000, acting_decay=False)
    arrive(exact, 0, "a", 10_000, "a1")
    assert exact.policy.tokens(exact.programs["a"]) == 10_000


def test_chars_per_token_is_stable_per_program_and_inside_its_range():
    pol = make_policy("thunderagent", token_estimate="chars")
    values = [pol.chars_per_token_of(f"prog-{i}") for i in range(200)]
    assert values == [pol.chars_per_token_of(f"prog-{i}") for i in range(200)]
    assert 3.0 <= min(values) < 3.2 and 4.8 < max(values) <= 5.0


def test_prepare_ahead_readies_the_sandboxes_of_programs_left_waiting():
    for ahead, expected in ((0, set()), (2, {"w0", "w1"})):
        s = sched(10_000, acting_decay=False, prepare_ahead=ahead)
        arrive(s, 0, "hog", 9500, "hog")
        s.handle(RequestFinished(1, "hog", 9500, 0, tool="train"))
        for i in range(3):
            arrive(s, 2 + i, f"w{i}", 1000 + 100 * i, f"w{i}")
        out = s.handle(Tick(5))
        assert {d.program_id for d in out if isinstance(d, PrepareSandbox)} == expected
        assert not dispatched(out) and not any(isinstance(d, Resume) for d in out)


def test_bad_options_are_refused_with_the_choices():
    for opts, match in (({"acting_decay": "sometimes"}, "acting_decay"), ({"placement": "random"}, "placement"),
                        ({"token_estimate": "words"}, "token_estimate"), ({"force_resume_s": 0}, "force_resume_s"),
                        ({"prepare_ahead": -1}, "prepare_ahead"), ({"chars_per_token": (5.0, 3.0)}, "chars_per_token")):
        with pytest.raises(ValueError, match=match):
            make_policy("thunderagent", **opts)

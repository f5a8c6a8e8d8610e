"""The sans-I/O scheduler core and its policies: events in, decisions out (pure logic)."""

from __future__ import annotations

import pytest

from scheduler.core import (
    BackendObserved, BackendView, CollectSandbox, Dispatch, Pause, Pin, PrepareSandbox, ProgramReleased,
    RequestArrived, RequestFinished, Resume, Retain, Scheduler, Status, Tick, ToolDurations, ToolEnded, Unpin,
    UnknownProgram, make_policy,
)


def sched(policy: str, *caps: int, **opts: object) -> Scheduler:
    return Scheduler(policy, backends=[BackendView(f"b{i}", c, prefill_s_per_token=1e-4) for i, c in enumerate(caps)],
                     **opts)


def arrive(s: Scheduler, now: float, pid: str, tokens: int, rid: str | None = None, **kw: object) -> list:
    return s.handle(RequestArrived(now, pid, rid or f"{pid}-{now}", tokens, **kw))


def dispatched(decisions: list) -> list[tuple[str, str]]:
    return [(d.program_id, d.backend) for d in decisions if isinstance(d, Dispatch)]


# ---- tool durations ----------------------------------------------------------------------------


def test_tool_durations_prior_then_learned_and_tail_grows():
    d = ToolDurations(min_samples=5, prior_mean_s=4.0)
    assert d.expected_remaining(0) == 4.0 and d.cdf(4.0) == pytest.approx(0.632, abs=1e-3)
    for x in [1, 1, 1, 1, 1, 1, 1, 1, 100, 200]:
        d.record(x)
    assert d.learned and d.quantile(0.5) == 1 and d.cdf(1.0) == 0.8
    # heavy tail: once past the short calls, the expected remaining time jumps
    assert d.expected_remaining(0.5) == pytest.approx(30.9 - 0.5, abs=0.1)
    assert d.expected_remaining(2.0) == pytest.approx(150 - 2.0)
    assert d.expected_remaining(500) == 200  # past every sample: the top decile's mean


def test_keep_horizon_keeps_a_heavy_tailed_call_through_its_likely_short_start():
    """Durations 1 s (80 %) and 100-200 s: the mean remaining time at the start (30.4 s) is
    above a recompute worth 10 s, so the mean rule releases at once; keeping for the first
    second costs ~1 s and saves the recompute 80 % of the time, so the threshold rule keeps,
    and releases once the call is past its short mode (then only the tail is left)."""
    d = ToolDurations(min_samples=5, prior_mean_s=4.0)

    def keeps(elapsed: float, recompute_s: float) -> bool:
        return d.keep_horizon(elapsed, recompute_s) is not None

    assert keeps(0, 5.0) and not keeps(0, 3.0)  # the prior: the mean rule
    for x in [1, 1, 1, 1, 1, 1, 1, 1, 100, 200]:
        d.record(x)
    assert not d.expected_remaining(0.0) < 10.0  # the mean rule would release it
    assert keeps(0.0, 10.0) and keeps(0.5, 10.0)
    assert not keeps(2.0, 10.0)  # in its tail: 148 s expected against a 10 s recompute
    assert keeps(2.0, 200.0)  # unless recomputing costs more than waiting for the tail
    assert not keeps(0.0, 0.5)  # a recompute cheaper than the shortest call: release
    assert not keeps(500.0, 100.0) and keeps(500.0, 300.0)  # past every sample: the mean rule
    # wherever the mean rule keeps, this one keeps too (keeping to the end is one of its choices)
    for t in (0.0, 0.5, 1.0, 1.5, 50.0, 150.0):
        for k in (0.5, 2.0, 10.0, 40.0, 120.0, 400.0):
            if d.expected_remaining(t) < k:
                assert keeps(t, k), (t, k)


def test_unknown_policy_and_program():
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("nope")
    with pytest.raises(ValueError, match="keep_rule"):
        make_policy("program", keep_rule="nope")
    s = sched("request", 1000)
    with pytest.raises(UnknownProgram):
        s.handle(ProgramReleased(0, "ghost"))


# ---- request ------------------------------------------------------------------------------------


def test_request_dispatches_at_once_and_sticks_unless_imbalanced():
    s = sched("request", 10_000, 10_000)
    first = dispatched(arrive(s, 0, "p", 100))
    assert len(first) == 1
    home = first[0][1]
    s.handle(RequestFinished(1, "p-0", 100, 10, tool="bash"))
    assert dispatched(arrive(s, 2, "p", 200)) == [("p", home)]  # its prefix lives there
    # 40 in-flight requests on home, none elsewhere: imbalanced, so least loaded wins
    for i in range(40):
        arrive(s, 3, f"q{i}", 10, rid=f"q{i}")
        s.programs[f"q{i}"].backend = home
    s.backends[home].inflight = 41
    other = "b1" if home == "b0" else "b0"
    s.backends[other].inflight = 0
    s.handle(RequestFinished(4, "p-2", 200, 10, tool="bash"))
    assert dispatched(arrive(s, 5, "p", 300)) == [("p", other)]


# ---- thunderagent -----------------------------------------------------------------------------


def test_thunderagent_pauses_shortest_acting_first_and_restores_at_tick():
    s = sched("thunderagent", 10_000, acting_decay=False)
    for pid, tokens in (("a", 3000), ("b", 2000), ("c", 4000)):
        assert dispatched(arrive(s, 0, pid, tokens, rid=pid)) == [(pid, "b0")]
    # all three acting, then contexts grow past capacity
    for pid, tokens in (("a", 3000), ("b", 2000), ("c", 4000)):
        s.handle(RequestFinished(1, pid, tokens, 500, tool="bash"))
    new = arrive(s, 1.5, "d", 1000, rid="d")
    assert dispatched(new) == []  # does not fit (3500+2500+4500+300 > 10000): waits
    out = s.handle(Tick(5))
    pauses = [d.program_id for d in out if isinstance(d, Pause)]
    assert pauses == ["b"]  # the shortest acting program, just enough to fit
    assert s.programs["b"].status is Status.PAUSED
    # b's tool ends; its request is held
    assert dispatched(arrive(s, 6, "b", 2600, rid="b2")) == []
    # c is released: room, but ThunderAgent restores only at the tick
    out = s.handle(ProgramReleased(7, "c"))
    assert any(isinstance(d, CollectSandbox) for d in out) and not dispatched(out)
    out = s.handle(Tick(10))
    resumed = [d.program_id for d in out if isinstance(d, Resume)]
    assert resumed[0] == "b"  # a reasoning program (its request waits) before the new one
    assert ("b", "b0") in dispatched(out) and ("d", "b0") in dispatched(out)


def test_thunderagent_acting_decay_counts_idle_programs_less():
    s = sched("thunderagent", 10_000)
    arrive(s, 0, "a", 6000, rid="a")
    s.handle(RequestFinished(1, "a", 6000, 100, tool="sim"))
    policy = s.policy
    assert policy.cost(s.programs["a"], 1) == pytest.approx(6100)
    assert policy.cost(s.programs["a"], 4) == pytest.approx(6100 / 8)


# ---- ttl (Continuum) ----------------------------------------------------------------------------


def test_ttl_pins_for_short_tools_not_for_long_ones_and_expires():
    s = sched("ttl", 400_000)
    for i in range(10):  # history: "ls" returns in 1 s, "train" in 500 s
        s.tools.record("ls", 1.0)
        s.tools.record("train", 500.0)
    arrive(s, 0, "p", 8000, rid="r1")
    out = s.handle(RequestFinished(1, "r1", 8000, 100, tool="ls"))
    assert [type(d) for d in out] == [Pin] and s.programs["p"].pin_until == pytest.approx(2.0)
    out = s.handle(Tick(3))
    assert [type(d) for d in out] == [Unpin]  # expired
    arrive(s, 4, "p", 8200, rid="r2")
    out = s.handle(RequestFinished(5, "r2", 8200, 100, tool="train"))
    assert not any(isinstance(d, Pin) for d in out)  # not worth holding memory 500 s


def test_ttl_releases_one_pin_under_pressure():
    s = sched("ttl", 100_000)
    for i in range(10):
        s.tools.record("ls", 1.0)
    for pid in ("a", "b"):
        arrive(s, 0, pid, 1000, rid=pid)
        s.handle(RequestFinished(0.5, pid, 1000, 10, tool="ls"))
    assert s.programs["a"].pinned and s.programs["b"].pinned
    out = s.handle(BackendObserved(0.6, "b0", 100_000, used_tokens=99_000, queued=3))
    assert [type(d) for d in out] == [Unpin]


# ---- program (ours) -------------------------------------------------------------------------------


def test_program_admits_per_request_and_holds_what_does_not_fit():
    s = sched("program", 10_000)
    assert dispatched(arrive(s, 0, "a", 6000, rid="a", max_tokens=100)) == [("a", "b0")]
    out = arrive(s, 0, "b", 6000, rid="b", max_tokens=100)
    assert dispatched(out) == [] and s.programs["b"].status is Status.WAITING
    out = s.handle(Tick(1))  # the next to run get their sandboxes ready before they resume
    assert any(isinstance(d, PrepareSandbox) and d.program_id == "b" for d in out)
    out = s.handle(RequestFinished(1, "a", 6000, 50))  # a final answer, then released
    out = s.handle(ProgramReleased(1, "a"))
    assert ("b", "b0") in dispatched(out)  # restored on the event, not at a tick


def test_program_counts_a_shared_prefix_once():
    s = sched("program", 10_000)
    for pid in ("a", "b", "c"):  # 3 x 3000 tokens, 2000 of them one shared system prompt
        out = arrive(s, 0, pid, 3000, rid=pid, max_tokens=100, prefix_key="sys", prefix_tokens=2000)
        assert dispatched(out) == [(pid, "b0")]
    assert s.policy.footprint(s.backends["b0"], 0) == pytest.approx(2000 + 3 * 1100)


def test_program_keeps_short_tools_releases_heavy_tails_when_others_wait():
    s = sched("program", 20_000)
    s.backends["b0"].prefill_s_per_token = 1e-2  # a slow engine: recomputing 8k tokens costs 80 s
    for _ in range(40):
        s.tools.record("ls", 0.5)
        s.tools.record("sim", 0.5)
    for _ in range(2):
        s.tools.record("sim", 400.0)
    arrive(s, 0, "a", 8000, rid="a", max_tokens=100)
    arrive(s, 0, "b", 8000, rid="b", max_tokens=100)
    arrive(s, 0, "w", 8000, rid="w", max_tokens=100)  # waits: demand exists
    assert s.programs["w"].status is Status.WAITING
    s.handle(RequestFinished(1, "a", 8000, 100, tool="ls"))
    assert s.programs["a"].kept  # back in a moment: keep
    s.handle(RequestFinished(1, "b", 8000, 100, tool="sim"))
    assert s.programs["b"].kept  # most "sim" calls are short too
    out = s.handle(Tick(3.0))  # 2 s in: b is in the tail now; its memory goes to w
    assert not s.programs["b"].kept and ("w", "b0") in dispatched(out)
    # b's tool ends while w runs: b does not fit, it waits rather than thrash the engine
    out = arrive(s, 4, "b", 8200, rid="b2", max_tokens=100)
    assert dispatched(out) == [] and s.programs["b"].status is Status.PAUSED
    # a comes back: it was kept, so it is dispatched at once
    s.handle(ToolEnded(1.6, "a"))
    assert dispatched(arrive(s, 4.1, "a", 8200, rid="a2", max_tokens=100)) == [("a", "b0")]


@pytest.mark.parametrize("ranks", [True, False])
def test_program_ranks_kv_only_on_backends_that_evict_by_priority(ranks: bool):
    """On a backend with SGLang's priority eviction: every call carries its dispatch time as its
    rank, and a program kept through a tool call while others wait gets one Retain to the end
    of its expected tool time (a lapsed rank is not renewed). Elsewhere: neither."""
    s = sched("program", 20_000)
    s.backends["b0"].prefill_s_per_token = 1e-2  # recomputing is dear: short tools are kept
    s.handle(BackendObserved(0, "b0", 20_000, ranks_kv=ranks))
    for _ in range(20):
        s.tools.record("ls", 3.0)
    out = arrive(s, 5, "a", 8000, rid="a", max_tokens=100) + arrive(s, 5, "b", 8000, rid="b", max_tokens=100)
    assert [d.retain_until for d in out if isinstance(d, Dispatch)] == ([5, 5] if ranks else [None, None])
    arrive(s, 6, "w", 8000, rid="w", max_tokens=100)  # does not fit: someone waits
    out = s.handle(RequestFinished(9, "a", 8000, 100, tool="ls"))
    assert s.programs["a"].kept
    retains = [d for d in out if isinstance(d, Retain)]
    assert [(d.program_id, d.backend, d.until) for d in retains] == ([("a", "b0", 12.0)] if ranks else [])
    out = s.handle(Tick(11.5)) + s.handle(Tick(12.6))  # still kept past its rank: not renewed
    assert not [d for d in out if isinstance(d, Retain)]
    # request, thunderagent and ttl never rank: they send SGLang nothing new
    for policy in ("request", "thunderagent", "ttl"):
        t = sched(policy, 20_000)
        t.handle(BackendObserved(0, "b0", 20_000, ranks_kv=True))
        assert all(d.retain_until is None for d in arrive(t, 0, "x", 100, rid="x") if isinstance(d, Dispatch))


def test_program_prices_a_recompute_by_the_running_requests_and_ranks_to_the_sooner_horizon():
    """The threshold rule (the default) prices a recompute as prefill(c) times the contexts of the
    other programs using the backend (a call running, or acting and kept: what the prefill
    stalls), not every token it holds with decode headroom; and a
    kept program's KV is ranked to its keep horizon when that comes before the tool's expected
    return (here the short mode's 1 s, not the 30.8 s mean a heavy tail sets), where the mean
    rule would have released it."""
    for rule in ("threshold", "mean"):
        s = sched("program", 40_000, keep_rule=rule)
        b0 = s.backends["b0"]
        b0.prefill_s_per_token = 1e-3
        s.handle(BackendObserved(0, "b0", 40_000, ranks_kv=True))
        for x in [1, 1, 1, 1, 1, 1, 1, 1, 100, 200]:
            s.tools.record("t", x)
        for x in range(1, 11):
            s.tools.record("u", x)  # stable: kept to its end, expected back in 5.5 s
        arrive(s, 5, "a", 8000, rid="a", max_tokens=100)
        arrive(s, 5, "b", 16000, rid="b", max_tokens=100)
        arrive(s, 6, "w", 20000, rid="w", max_tokens=100)  # does not fit: someone waits
        assert s.programs["w"].status is Status.WAITING
        out = s.handle(RequestFinished(9, "a", 8000, 100, tool="t"))
        a = s.programs["a"]
        retains = [d.until for d in out if isinstance(d, Retain)]
        if rule == "threshold":
            assert s.policy.recompute_price(a, b0, 9) == pytest.approx(16.0)  # b's 16,000 tokens in flight
            assert a.kept and retains == [11.0]  # horizon 1 s, ranked at least two checks ahead
            out = s.handle(RequestFinished(9.5, "b", 16000, 100, tool="u"))  # nothing runs now
            # b is kept to its tool's end (10 s at most) but ranked only to its expected return:
            # a rank is never lowered, so one past the call would protect a context nobody needs
            assert s.programs["b"].kept and [d.until for d in out if isinstance(d, Retain)] == [15.0]
            assert s.policy.recompute_price(a, b0, 9.5) == pytest.approx(16.1)  # kept b is back soon: it counts
            s.programs["b"].kept = False
            s.touch(s.programs["b"])
            assert s.policy.recompute_price(a, b0, 9.5) == pytest.approx(8.1)  # nobody else: a's own context
        else:  # every held token: a released itself, so b's 16,000 plus its decode headroom
            assert not a.kept and retains == []  # 30.8 s expected against a recompute of 16-24 s
            assert s.policy.recompute_price(a, b0, 9) == pytest.approx(1e-3 * 16100)


def test_program_relieves_growth_down_to_the_admission_mark():
    s = sched("program", 10_000, admit_fraction=0.8)
    for pid in ("a", "b", "c", "d"):
        arrive(s, 0, pid, 1800, rid=pid, max_tokens=50)
    assert all(s.programs[p].status is Status.ACTIVE for p in "abcd")
    for pid in "abcd":  # every context grows to 2,900 tokens: 4 x 2,950 > 10,000
        s.handle(RequestFinished(1, pid, 2800, 100, tool="bash"))
        arrive(s, 1.5, pid, 2900, rid=pid + "2", max_tokens=50)
    out = s.handle(Tick(2))
    paused = [d.program_id for d in out if isinstance(d, Pause)]
    assert len(paused) == 2  # 4 x 3000 -> under 8,000 needs two out, not one
    assert s.policy.footprint(s.backends["b0"], 2) <= 8000


def grown(s: Scheduler, sizes: dict[str, tuple[int, int]], *, calling: bool) -> None:
    """Admit programs at their first size, then finish their calls at the second: left in their
    tool, or (``calling``) back from it with the next call already waiting."""
    for pid, (first, _) in sizes.items():
        arrive(s, 0, pid, first, rid=pid, max_tokens=50)
    assert all(s.programs[p].status is Status.ACTIVE for p in sizes)
    for pid, (first, second) in sizes.items():
        s.handle(RequestFinished(1, pid, first, second - first, tool="bash"))
        if calling:
            s.handle(ToolEnded(1.2, pid))
            arrive(s, 1.5, pid, second, rid=pid + "2", max_tokens=50)


def test_program_releases_the_fewest_acting_programs_and_pauses_reasoning_ones_shortest_first():
    sizes = {"a": (1500, 2400), "b": (1500, 2400), "c": (1500, 2400), "d": (3000, 5000)}
    s = sched("program", 10_000, admit_fraction=0.8)
    grown(s, sizes, calling=False)  # all in their tool, kept (nobody waits): 3 x 2,400 + 5,000 > 10,000
    out = s.handle(Tick(2))
    assert [d.program_id for d in out if isinstance(d, Pause)] == ["d"]  # one release frees 5,000 of 4,200
    assert s.policy.footprint(s.backends["b0"], 2) == pytest.approx(3 * 2400)
    # reasoning: a paused one finishes its call and waits; a short one is back soonest
    s = sched("program", 10_000, admit_fraction=0.8)
    grown(s, sizes, calling=True)  # all calling again: 3 x 2,450 + 5,050 > 10,000
    out = s.handle(Tick(2))
    assert [d.program_id for d in out if isinstance(d, Pause)] == ["a", "b"]


@pytest.mark.parametrize("aging_s", [None, 30.0])
def test_program_restores_smallest_first_or_by_time_held_with_aging(aging_s: float | None):
    s = sched("program", 10_000, admit_fraction=1.0, aging_s=aging_s)
    arrive(s, 0, "stay", 5000, rid="stay", max_tokens=100)
    arrive(s, 0, "hog", 4000, rid="hog", max_tokens=100)
    assert dispatched(arrive(s, 0, "big", 4000, rid="big", max_tokens=100)) == []  # needs 4,100 of 800
    assert dispatched(arrive(s, 50, "small", 3500, rid="small", max_tokens=100)) == []
    assert s.programs["big"].held(60) == pytest.approx(60) and s.programs["small"].held(60) == pytest.approx(10)
    s.handle(RequestFinished(60, "hog", 4000, 50))
    out = s.handle(ProgramReleased(60, "hog"))  # 4,900 free: room for one of them, not both
    # smallest first: 3,500 < 4,000; aged: 4,000 / (1 + 60/30) < 3,500 / (1 + 10/30)
    assert dispatched(out) == [("small" if aging_s is None else "big", "b0")]
    winner = s.programs["small" if aging_s is None else "big"]
    assert winner.held_s == pytest.approx(10 if aging_s is None else 60)  # time held, counted at dispatch
    assert s.programs["stay"].held_s == 0.0  # dispatched at once


def test_program_aging_must_be_positive():
    with pytest.raises(ValueError, match="aging_s"):
        make_policy("program", aging_s=0)


def test_policy_options_reach_the_runtime_and_bad_ones_stop_the_service_at_start():
    from pydantic import ValidationError

    from orchestrator.settings import Settings
    from scheduler.backends.sglang import SGLangBackend
    from scheduler.runtime import ProgramRuntime

    settings = Settings(scheduler_policy_options='{"aging_s": 600}')
    runtime = ProgramRuntime({"b": SGLangBackend("http://127.0.0.1:9")}, policy=settings.scheduler_policy,
                             policy_options=settings.scheduler_policy_options)
    assert runtime.sched.policy.aging_s == 600
    for policy, options, says in (
            ("program", '{"aging_s": -1}', "aging_s must be positive"),
            ("program", '{"agingS": 600}', "policy 'program' has no option 'agingS'; its options: .*aging_s"),
            ("request", '{"aging_s": 600}', "policy 'request' has no option 'aging_s'; its options: none"),
            ("fifo", "{}", "unknown policy 'fifo'")):
        with pytest.raises(ValidationError, match=says):
            Settings(scheduler_policy=policy, scheduler_policy_options=options)


# ---- a program restricted to some backends (a model / backend the caller chose) ------------------


@pytest.mark.parametrize("policy", ["request", "ttl", "thunderagent", "program"])
def test_restricted_programs_run_only_where_allowed(policy: str):
    s = sched(policy, 10_000, 10_000, 10_000)
    for b in ("b0", "b1", "b2"):
        s.handle(BackendObserved(0, b, 10_000, 0, 0, 0, True))
    placed = []
    for i in range(6):
        out = arrive(s, 0.1 * i, f"p{i}", 500, backends=("b2",))
        out += s.handle(Tick(0.1 * i + 6))  # thunderagent admits new programs at its tick
        placed += dispatched(out)
    assert sorted(placed) == [(f"p{i}", "b2") for i in range(6)]
    free = dispatched(arrive(s, 1, "q", 500) + s.handle(Tick(12)))
    assert len(free) == 1  # unrestricted programs may go anywhere


def test_a_restricted_program_waits_rather_than_run_elsewhere():
    s = sched("program", 2_000, 100_000)
    assert dispatched(arrive(s, 0, "big", 1_500, backends=("b0",))) == [("big", "b0")]
    # b0 is full: the next one restricted to b0 waits although b1 has room
    assert dispatched(arrive(s, 1, "next", 1_500, backends=("b0",)) + s.handle(Tick(2))) == []
    assert dispatched(s.handle(ProgramReleased(3, "big"))) == [("next", "b0")]


@pytest.mark.parametrize("policy", ["thunderagent", "program"])
def test_a_held_call_given_up_is_never_dispatched_later(policy: str):
    """Its caller left while we held it (the gateway's client went away): when room comes, it
    must not go to the engine for nobody, nor count as in flight for good."""
    s = sched(policy, 10_000)
    assert dispatched(arrive(s, 0, "big", 8_000, rid="big-0")) == [("big", "b0")]
    assert dispatched(arrive(s, 1, "late", 6_000, rid="late-0")) == []  # held: no room
    late = s.programs["late"]
    assert [r.rid for r in late.pending] == ["late-0"]
    s.handle(RequestFinished(2, "late-0", 6_000, 0, 0, aborted=True))
    assert not late.pending and not late.inflight
    s.handle(RequestFinished(3, "big-0", 8_000, 10, 0))
    s.handle(ProgramReleased(3, "big"))
    assert dispatched(s.handle(Tick(10))) == [] and not late.inflight
    assert s.backends["b0"].inflight == 0
    # its next call runs as any would
    assert dispatched(arrive(s, 11, "late", 6_000, rid="late-1")) == [("late", "b0")]


@pytest.mark.parametrize("policy", ["request", "ttl", "thunderagent", "program"])
def test_a_program_larger_than_every_backend_is_sent_not_held_for_ever(policy: str):
    """No room would ever come for it: its call goes to the engine (which refuses a prompt longer
    than its context, or runs it), and once refused its estimate no longer takes others' room."""
    s = sched(policy, 10_000, 4_000)
    assert dispatched(arrive(s, 0, "small", 3_000, rid="small-0")) != []
    sent = dispatched(arrive(s, 1, "huge", 50_000, rid="huge-0"))
    assert [pid for pid, _ in sent] == ["huge"]
    if policy in ("thunderagent", "program"):
        assert sent == [("huge", "b0")]  # the largest
    s.handle(RequestFinished(2, "huge-0", 50_000, 0, 0, aborted=True))  # the engine refused it
    assert s.programs["huge"].tokens == 0
    s.handle(Tick(10))
    assert dispatched(arrive(s, 11, "next", 6_000, rid="next-0")) != []  # room was not taken by it

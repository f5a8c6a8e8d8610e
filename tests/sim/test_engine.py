"""SimEngine behaviour in virtual time: caching, eviction, priority, abort, determinism."""

from __future__ import annotations

from scheduler.sim.clock import VirtualClock
from scheduler.sim.cost import preset
from scheduler.sim.engine import EngineConfig, SimEngine, SimRequest
from scheduler.sim.script import AgentTraceScript, ChunkedScript, TextScript, Turn

COST = preset("llama-3.1-8b-h100")


def _engine(**config: object) -> tuple[VirtualClock, SimEngine]:
    clock = VirtualClock()
    return clock, SimEngine(clock, EngineConfig(cost=COST, **config))  # type: ignore[arg-type]


def _run(clock: VirtualClock, engine: SimEngine, req: SimRequest, at: float | None = None) -> SimRequest:
    clock.call_at(clock.now() if at is None else at, lambda: engine.submit(req))
    clock.run()
    return req


def test_repeated_prefix_is_cached_and_faster() -> None:
    clock, engine = _engine()
    prompt = list(range(3000))
    first = _run(clock, engine, SimRequest("a", prompt, max_new_tokens=20))
    second = _run(clock, engine, SimRequest("b", prompt + [7, 8, 9], max_new_tokens=20))
    assert first.cached_tokens == 0 and first.finish_reason in ("stop", "length")
    assert second.cached_tokens == 3000
    assert second.ttft is not None and first.ttft is not None and second.ttft < first.ttft / 5
    assert 0 < first.completion_tokens <= 20


def test_output_tokens_are_cached_for_the_next_turn() -> None:
    clock, engine = _engine()
    first = _run(clock, engine, SimRequest("a", list(range(500)), max_new_tokens=50, ignore_eos=True))
    follow = first.full_ids() + [1, 2, 3]
    second = _run(clock, engine, SimRequest("b", follow, max_new_tokens=5))
    assert second.cached_tokens == len(first.full_ids()) - 1  # the last sampled token has no KV yet


def test_eviction_under_pressure_forces_reprefill() -> None:
    clock, engine = _engine(kv_capacity_tokens=10_000)
    a = list(range(6000))
    _run(clock, engine, SimRequest("a1", a, max_new_tokens=5))
    _run(clock, engine, SimRequest("b", list(range(10**6, 10**6 + 6000)), max_new_tokens=5))  # pushes a out
    again = _run(clock, engine, SimRequest("a2", a, max_new_tokens=5))
    assert again.cached_tokens < 6000 - 2000
    assert engine.cache.size <= engine.capacity


def test_running_requests_are_retracted_when_kv_runs_out() -> None:
    clock, engine = _engine(kv_capacity_tokens=4000)
    reqs = [SimRequest(f"r{i}", list(range(i * 10**5, i * 10**5 + 900)), max_new_tokens=1200, ignore_eos=True)
            for i in range(3)]
    for r in reqs:
        clock.call_at(0, lambda r=r: engine.submit(r))
    clock.run()
    assert all(r.finish_reason == "length" and r.completion_tokens == 1200 for r in reqs)
    assert engine.stats.retractions > 0
    assert sum(r.prefilled_tokens for r in reqs) > 3 * 900  # retracted work was recomputed


def test_priority_scheduling_serves_higher_priority_first() -> None:
    order: list[str] = []
    clock, engine = _engine(enable_priority_scheduling=True, max_running_requests=1)
    for i, prio in enumerate([0, 0, 5, 1]):
        req = SimRequest(f"r{i}-p{prio}", list(range(i * 1000, i * 1000 + 100)), max_new_tokens=10, priority=prio,
                         on_finish=lambda r: order.append(r.rid))
        clock.call_at(0.001 * (i > 0), lambda req=req: engine.submit(req))
    clock.run()
    assert order == ["r0-p0", "r2-p5", "r3-p1", "r1-p0"]  # r0 was already running


def test_abort_waiting_and_running_requests() -> None:
    clock, engine = _engine(max_running_requests=1)
    running = SimRequest("run", list(range(100)), max_new_tokens=500, ignore_eos=True)
    waiting = SimRequest("wait", list(range(200, 300)), max_new_tokens=5)
    for r in (running, waiting):
        clock.call_at(0, lambda r=r: engine.submit(r))
    clock.call_at(0.5, lambda: engine.abort("wait"))
    clock.call_at(1.0, lambda: engine.abort("run"))
    clock.run()
    assert waiting.finish_reason == "abort" and waiting.completion_tokens == 0
    assert running.finish_reason == "abort" and 0 < running.completion_tokens < 500
    assert running.finish_time == 1.0
    assert engine.used_tokens == 0 and engine.num_running == 0
    assert not engine.abort("run")  # already gone


def test_macro_steps_match_single_steps_exactly() -> None:
    def run(macro: int) -> list[tuple[float | None, float | None, int]]:
        clock, engine = _engine(max_macro_steps=macro)
        reqs = [SimRequest(f"r{i}", list(range(i * 10**4, i * 10**4 + 300 * (i + 1))), max_new_tokens=40 + 30 * i,
                           ignore_eos=True) for i in range(4)]
        for i, r in enumerate(reqs):
            clock.call_at(0.05 * i, lambda r=r: engine.submit(r))
        clock.run()
        return [(r.first_token_time, r.finish_time, r.completion_tokens) for r in reqs]

    stepwise, macro = run(1), run(256)
    for (t1, f1, n1), (t2, f2, n2) in zip(stepwise, macro):
        assert n1 == n2 and abs(t1 - t2) < 1e-9 and abs(f1 - f2) < 1e-9  # type: ignore[operator]


def test_same_seed_same_results() -> None:
    def run() -> list[tuple[str, int, int, float | None, str]]:
        clock, engine = _engine(kv_capacity_tokens=20_000)
        reqs = [SimRequest(f"r{i}", list(range(i % 3 * 5000, i % 3 * 5000 + 2000 + i)), max_new_tokens=64) for i in range(12)]
        for i, r in enumerate(reqs):
            clock.call_at(0.01 * i, lambda r=r: engine.submit(r))
        clock.run()
        return [(r.rid, r.cached_tokens, r.completion_tokens, r.finish_time, r.text) for r in reqs]

    assert run() == run()


def test_scripts_tool_calls_logprobs_and_chunks() -> None:
    clock = VirtualClock()
    trace = SimEngine(clock, EngineConfig(cost=COST), script=AgentTraceScript([Turn(30, "bash", '{"cmd": "ls"}'), Turn(10)]))
    t0 = _run(clock, trace, SimRequest("t0", [1, 2, 3], meta={"turn": 0}))
    t1 = _run(clock, trace, SimRequest("t1", [1, 2, 3], meta={"turn": 1}))
    assert t0.finish_reason == "tool_calls" and t0.tool_calls[0].name == "bash" and t0.completion_tokens == 30
    assert t1.finish_reason == "stop" and not t1.tool_calls and t1.completion_tokens == 10

    text = SimEngine(clock, EngineConfig(cost=COST), script=TextScript("The answer is 42", logprob=-0.25))
    r = _run(clock, text, SimRequest("x", [5], logprobs=True, top_logprobs=1))
    assert r.text == "The answer is 42" and r.plan is not None and set(r.plan.logprobs) == {-0.25}

    chunked = SimEngine(clock, EngineConfig(cost=COST), script=ChunkedScript(chunk_tokens=8, chunks=3))
    seen: list[str] = []
    c = _run(clock, chunked, SimRequest("c", [9], max_new_tokens=100, on_tokens=lambda q: seen.append(q.text)))
    assert c.completion_tokens == 24 and c.text.count(" [") == 3 and seen[-1] == c.text

"""Pipeline logic without I/O: chunk cutting, round planning, the aggregator's growing
conversation, and both executors on a scripted in-memory LLM (timing controlled by the test)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import pytest

from agents.pipeline_chunks import ChunkCutter, RoundPlanner, Upstream, count_tokens
from agents.pipeline_exec import PipelineError, PipelineExecutor
from agents.pipeline_prompts import AGGREGATE_PROMPT, Conversation, RestartGuard
from agents.pipeline_spec import Node, PipelineInput
from scheduler.backends.base import BackendUnavailable, GenerateRequest, GenerationChunk, Usage


# ---- chunks -------------------------------------------------------------------------------------

def test_cutter_follows_the_schedule_and_never_splits_a_word_across_deltas():
    sizes = [2, 3]
    cut = ChunkCutter(lambda k: sizes[k] if k < len(sizes) else 4)
    text = " alpha beta gamma delta eps zeta eta theta iota"
    got: list[str] = []
    for i in range(0, len(text), 3):  # deltas that split words
        got += cut.feed(text[i:i + 3])
    rest = cut.finish()
    assert "".join(cut.chunks) == text and rest is not None
    assert [count_tokens(c) for c in cut.chunks[:-1]] == [2, 3, 4, 4][: len(cut.chunks) - 1]
    assert got == cut.chunks[:-1]
    # " alpha" is two pieces (" alph", "a"), " gamma" too: chunks of 2, 3, 4 pieces end on words here
    assert cut.chunks == [" alpha", " beta gamma", " delta eps zeta", " eta theta iota"]


def test_cutter_waits_for_the_next_piece_before_closing_a_chunk():
    cut = ChunkCutter(lambda _k: 2)
    assert cut.feed(" ab cd") == []  # " cd" could still grow into " cde..."
    assert cut.feed("e") == []
    assert cut.feed(" f") == [" ab cde"]
    assert cut.finish() == " f" and cut.chunks == [" ab cde", " f"]
    assert ChunkCutter(lambda _k: 2).finish() is None


def test_planner_waits_for_every_running_input_and_counts_ended_ones_as_arrived():
    ups = [Upstream(), Upstream(), Upstream()]
    p = RoundPlanner(3)
    ups[0].chunks.append("a0")
    ups[1].chunks.append("b0")
    assert p.plan(ups) is None  # the third has nothing yet
    ups[2].ended = True  # ...and never will: it counts as arrived
    plan = p.plan(ups)
    assert plan is not None and plan.parts == ["a0", "b0", ""] and plan.complete == [False, False, True]
    assert not plan.final
    p.commit(plan)
    assert p.plan(ups) is None
    ups[0].chunks += ["a1", "a2"]  # the first ran ahead
    assert p.plan(ups) is None
    ups[1].chunks.append("b1")
    plan = p.plan(ups)
    assert plan.parts == ["a1a2", "b1", ""] and plan.taken == [3, 2, 0]  # catches up in one round
    p.commit(plan)
    ups[0].ended = ups[1].ended = True
    plan = p.plan(ups)  # nothing new, but everything ended: the final round
    assert plan.final and plan.parts == ["", "", ""]
    p.commit(plan)
    assert p.plan(ups) is None


def test_conversation_only_appends_and_one_round_is_the_classic_prompt():
    conv = Conversation("Q?", "Synthesize.", 2)
    conv.add_round(["a0", "b0"], [False, False]).output = "X0"
    m1 = conv.messages()
    assert m1[0] == {"role": "system", "content": "Synthesize.\n\nResponse 1:\na0 [...]\n\nResponse 2:\nb0 [...]"}
    assert m1[1] == {"role": "user", "content": "Q?"} and len(m1) == 2
    conv.add_round(["a1", ""], [True, True]).output = "X1"
    m2 = conv.messages()
    assert m2[:2] == m1 and m2[2] == {"role": "assistant", "content": "X0"}
    assert m2[3]["role"] == "user"
    assert m2[3]["content"].startswith("More of the responses arrived.\n\nResponse 1, continued:\na1\n\n"
                                       "Response 2 ended there.")
    conv.add_round(["", ""], [True, True])
    m3 = conv.messages()
    assert m3[:4] == m2 and m3[4] == {"role": "assistant", "content": "X1"}
    assert "The responses are complete." in m3[5]["content"]
    assert conv.text == "X0X1"
    whole = Conversation("Q?", "Synthesize.", 2)
    whole.add_round(["a0a1", "b0"], [True, True])
    assert whole.messages()[0]["content"] == "Synthesize.\n\nResponse 1:\na0a1\n\nResponse 2:\nb0"


def test_settings_resolve_agent_then_layer_then_pipeline():
    spec = PipelineInput(task="t", temperature=0.3, max_tokens=99, system_prompt="Be brief.", layers=[
        {"agents": [{}, {"model": "big", "temperature": 1.0}], "model": "small"},
        {"agents": [{}]}], aggregator={"max_tokens": 7})
    nodes = {n.id: n for n in spec.nodes()}
    assert list(nodes) == ["p0.0", "p0.1", "p1.0", "agg"]
    assert (nodes["p0.0"].agent.model, nodes["p0.0"].agent.temperature) == ("small", 0.3)
    assert (nodes["p0.1"].agent.model, nodes["p0.1"].agent.temperature) == ("big", 1.0)
    assert nodes["p0.0"].agent.system_prompt == "Be brief."
    assert nodes["p1.0"].agent.system_prompt == nodes["agg"].agent.system_prompt == AGGREGATE_PROMPT
    assert (nodes["agg"].agent.max_tokens, nodes["p1.0"].agent.max_tokens) == (7, 99)


# ---- executors on a scripted LLM ----------------------------------------------------------------

@dataclass
class Proposer:
    words: list[str]
    gates: dict[int, asyncio.Event] = field(default_factory=dict)  # before word i, wait for this
    fail_at: int | None = None
    stall_at: int | None = None


def reply_words(messages: list[dict[str, Any]], n: int) -> list[str]:
    """The fake aggregator's reply: a pure function of its prompt."""
    seed = hashlib.sha256(repr(messages).encode()).digest()
    return [f" w{seed[i % 32]}" for i in range(n)]


class FakeLLM:
    def __init__(self, proposers: dict[str, Proposer], agg_tokens: int = 12) -> None:
        self.proposers = proposers
        self.agg_tokens = agg_tokens
        self.requests: list[tuple[str, GenerateRequest]] = []
        self.closed: list[str] = []

    async def __call__(self, node: Node, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        self.requests.append((node.id, request))
        try:
            p = self.proposers.get(node.id)
            words = p.words if p else reply_words(request.messages or [], self.agg_tokens)
            out = words[: request.max_tokens]
            for i, w in enumerate(out):
                if p and i in p.gates:
                    await p.gates[i].wait()
                if p and p.fail_at == i:
                    raise BackendUnavailable("engine went away", backend="fake")
                if p and p.stall_at == i:
                    await asyncio.sleep(3600)
                await asyncio.sleep(0)
                yield GenerationChunk(rid=request.rid, text=w)
            reason = "length" if len(words) > request.max_tokens else "stop"
            yield GenerationChunk(rid=request.rid, finish_reason=reason,
                                  usage=Usage(prompt_tokens=10, completion_tokens=len(out)))
        finally:
            self.closed.append(node.id)


class Recorder:
    def __init__(self) -> None:
        self.deltas: list[tuple[int, str]] = []
        self.agents: list[tuple[str, dict[str, Any]]] = []
        self.rounds: list[dict[str, Any]] = []

    async def delta(self, round: int, text: str) -> None:
        self.deltas.append((round, text))

    async def agent(self, node: str, data: dict[str, Any]) -> None:
        self.agents.append((node, data))

    async def round(self, data: dict[str, Any]) -> None:
        self.rounds.append(data)


def words(tag: str, n: int) -> list[str]:
    return [f" {tag}{i}" for i in range(n)]


def spec(**kw: Any) -> PipelineInput:
    base: dict[str, Any] = {"task": "Q", "layers": [{"agents": [{}, {}, {}]}], "chunk_tokens": 2,
                            "aggregator": {"max_tokens": 40}, "delta_interval_s": 0, "temperature": 0}
    return PipelineInput(**{**base, **kw})


def agg_prompts(llm: FakeLLM) -> list[list[dict[str, Any]]]:
    return [r.messages for nid, r in llm.requests if nid == "agg"]  # type: ignore[misc]


async def test_staircase_rounds_grow_the_prompt_in_order():
    gates = [asyncio.Event() for _ in range(3)]
    llm = FakeLLM({"p0.0": Proposer(words("a", 6), {3: gates[0]}),
                   "p0.1": Proposer(words("b", 4), {3: gates[1]}),
                   "p0.2": Proposer(words("c", 2))}, agg_tokens=30)
    rec = Recorder()
    task = asyncio.create_task(PipelineExecutor(spec(aggregator_chunk_tokens=3), llm, rec).run())
    for _ in range(50):
        await asyncio.sleep(0)
    # round 0 ran on chunk 0 of a and b (closed once their third word started) and all of c, which ended
    prompts = agg_prompts(llm)
    assert len(prompts) == 1
    assert prompts[0][0]["content"].endswith("Response 1:\n a0 a1 [...]\n\nResponse 2:\n b0 b1 [...]"
                                             "\n\nResponse 3:\n c0 c1")
    assert llm.requests[-1][1].max_tokens == 3
    gates[0].set()
    for _ in range(50):
        await asyncio.sleep(0)
    assert len(agg_prompts(llm)) == 1  # b has no new chunk yet: no round
    gates[1].set()
    result = await task
    prompts = agg_prompts(llm)
    for earlier, later in zip(prompts, prompts[1:]):
        assert later[: len(earlier)] == earlier  # the prefix never changes
    # round 1 took a's chunks 1-2 (caught up) and b's chunk 1, and both ended there
    r1 = prompts[1][3]["content"]
    assert prompts[1][2]["role"] == "assistant"
    assert "Response 1, continued:\n a2 a3 a4 a5\n\nResponse 2, continued:\n b2 b3" in r1
    assert "Response 3" not in r1 and "[...]" not in r1
    assert [r["final"] for r in rec.rounds] == [False, True]
    assert result["answer"] == "".join(t for _, t in rec.deltas) and result["stop_reason"] == "finished"
    assert result["rounds"] == 2 and count_tokens(result["answer"]) == 3 + 30  # the last round wrote to its end
    assert {a: d["status"] for a, d in rec.agents} == {"p0.0": "finished", "p0.1": "finished", "p0.2": "finished"}
    assert result["ttft_s"] is not None and result["ttft_s"] <= result["elapsed_s"]


async def test_identical_to_wait_when_chunks_are_larger_than_every_output():
    props = {"p0.0": words("a", 5), "p0.1": words("b", 7), "p0.2": words("c", 3)}
    out = {}
    for mode in ("wait", "staircase"):
        llm = FakeLLM({k: Proposer(v) for k, v in props.items()})
        result = await PipelineExecutor(spec(mode=mode, chunk_tokens=100), llm, Recorder()).run()
        out[mode] = (result["answer"], agg_prompts(llm))
        assert result["rounds"] == 1
    assert out["wait"] == out["staircase"]


async def test_a_failing_proposer_keeps_what_it_sent_and_the_rest_go_on():
    llm = FakeLLM({"p0.0": Proposer(words("a", 6)), "p0.1": Proposer(words("b", 6), fail_at=3),
                   "p0.2": Proposer(words("c", 6))})
    rec = Recorder()
    result = await PipelineExecutor(spec(), llm, rec).run()
    assert result["stop_reason"] == "finished" and result["answer"]
    assert result["agents"]["p0.1"]["status"] == "failed"
    status = dict((a, d) for a, d in rec.agents)
    assert status["p0.1"]["status"] == "failed" and "engine went away" in status["p0.1"]["error"]
    text = "".join(m["content"] for m in agg_prompts(llm)[-1])
    assert " b0 b1 b2" in text and " b3" not in text and " a5" in text and " c5" in text


async def test_a_stalled_proposer_is_dropped_after_the_timeout_and_its_call_closed():
    llm = FakeLLM({"p0.0": Proposer(words("a", 6)), "p0.1": Proposer(words("b", 6), stall_at=2),
                   "p0.2": Proposer(words("c", 6))})
    result = await asyncio.wait_for(PipelineExecutor(spec(stall_timeout_s=0.2), llm, Recorder()).run(), 5)
    assert result["agents"]["p0.1"]["status"] == "stalled" and result["stop_reason"] == "finished"
    assert "p0.1" in llm.closed
    assert " b1" in agg_prompts(llm)[0][0]["content"]  # its first chunk made round 0


async def test_every_proposer_failing_fails_the_pipeline():
    for mode in ("wait", "staircase"):
        llm = FakeLLM({f"p0.{i}": Proposer(words("x", 4), fail_at=0) for i in range(3)})
        with pytest.raises(PipelineError) as err:
            await PipelineExecutor(spec(mode=mode), llm, Recorder()).run()
        assert err.value.code == "proposers_failed"
        assert not agg_prompts(llm)


async def test_two_layers_stream_through_the_middle_layer():
    llm = FakeLLM({"p0.0": Proposer(words("a", 8)), "p0.1": Proposer(words("b", 8))}, agg_tokens=10)
    s = spec(layers=[{"agents": [{}, {}]}, {"agents": [{}, {}], "max_tokens": 10}], chunk_tokens=4)
    result = await PipelineExecutor(s, llm, Recorder()).run()
    assert result["stop_reason"] == "finished"
    assert all(result["agents"][n]["status"] == "finished" for n in ("p0.0", "p0.1", "p1.0", "p1.1"))
    mid = [r.messages for nid, r in llm.requests if nid == "p1.0"]
    assert len(mid) >= 2 and " a0 a1 a2 a3 [...]" in mid[0][0]["content"]  # started on chunk 0
    final = agg_prompts(llm)
    assert final and "Response 1:\n w" in final[0][0]["content"]  # fed by the middle layer's output


async def test_cancel_closes_every_call_in_flight():
    gate = asyncio.Event()  # never set: proposers hang mid-stream
    llm = FakeLLM({f"p0.{i}": Proposer(words("a", 8), {4: gate}) for i in range(3)}, agg_tokens=10**6)
    task = asyncio.create_task(PipelineExecutor(spec(aggregator={"max_tokens": 10**4}), llm, Recorder()).run())
    for _ in range(100):
        await asyncio.sleep(0)
    assert len(agg_prompts(llm)) >= 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(llm.closed) == ["agg"] * len(agg_prompts(llm)) + ["p0.0", "p0.1", "p0.2"]


class Checkpoints:
    """``Step`` with a checkpoint store that outlives one executor (as the run store does)."""

    def __init__(self) -> None:
        self.done: dict[int, Any] = {}

    def step(self) -> Any:
        counter = iter(range(10**6))

        async def step(_name: str, fn: Any, *args: Any) -> Any:
            i = next(counter)
            if i in self.done:
                return self.done[i]
            out = await fn(*args)
            self.done[i] = json.loads(json.dumps(out))
            return self.done[i]

        return step


async def test_a_resumed_staircase_replays_its_rounds_and_appends():
    store = Checkpoints()
    never = asyncio.Event()
    first = FakeLLM({"p0.0": Proposer(words("a", 2)), "p0.1": Proposer(words("b", 9), {6: never}),
                     "p0.2": Proposer(words("c", 9), {6: never})}, agg_tokens=30)
    s = spec(aggregator={"max_tokens": 40})
    task = asyncio.create_task(PipelineExecutor(s, first, Recorder(), store.step()).run())
    for _ in range(200):
        await asyncio.sleep(0)
    assert len(store.done) == 2 and len(agg_prompts(first)) == 2  # rounds 0-1 done, round 2 waits for chunk 2
    task.cancel()  # the process dies
    with pytest.raises(asyncio.CancelledError):
        await task
    second = FakeLLM({"p0.0": Proposer(words("a", 2)), "p0.1": Proposer(words("b", 9)),
                      "p0.2": Proposer(words("c", 9))}, agg_tokens=30)
    result = await PipelineExecutor(s, second, Recorder(), store.step()).run()
    called = [nid for nid, _ in second.requests]
    assert "p0.0" not in called and called.count("p0.1") == called.count("p0.2") == 1  # ended one re-used
    resumed = agg_prompts(second)
    assert sum(m["role"] == "assistant" for m in resumed[0]) == 2  # it went on with round 2
    assert resumed[0][:4] == agg_prompts(first)[1]  # on the conversation the checkpoints rebuilt
    assert " a0 a1" in resumed[0][0]["content"]
    outputs = [store.done[i]["output"] for i in sorted(store.done)]
    assert result["answer"] == "".join(outputs) and result["rounds"] == len(outputs) >= 3


async def test_the_time_budget_ends_the_run_with_what_was_written():
    never = asyncio.Event()
    llm = FakeLLM({f"p0.{i}": Proposer(words("a", 9), {6: never}) for i in range(3)}, agg_tokens=30)
    result = await PipelineExecutor(spec(time_budget_s=0.3), llm, Recorder()).run()
    assert result["stop_reason"] == "time_budget" and result["rounds"] == 2
    assert count_tokens(result["answer"]) == 4 and sorted(set(llm.closed)) == ["agg", "p0.0", "p0.1", "p0.2"]


async def test_an_aggregator_cut_at_its_max_tokens_says_so_in_both_modes():
    for mode in ("wait", "staircase"):
        llm = FakeLLM({f"p0.{i}": Proposer(words("a", 9)) for i in range(3)}, agg_tokens=12)
        result = await PipelineExecutor(spec(mode=mode, aggregator={"max_tokens": 5}), llm, Recorder()).run()
        assert result["stop_reason"] == "max_tokens" and count_tokens(result["answer"]) == 5
        assert result["aggregator_usage"]["completion_tokens"] == 5


# ---- an aggregator that has answered, or starts over ------------------------------------------

def test_restart_guard_drops_a_round_that_starts_the_answer_over():
    g = RestartGuard(["The capital of France"])
    shown = [g.feed(d) for d in ("The", " capital of", " France", " is", " Paris.")]
    assert shown == ["", "", "", " is", " Paris."] and g.finish() == ""
    assert g.text == " is Paris." and g.dropped == len("The capital of France")


def test_restart_guard_drops_a_repeat_of_the_last_round_only():
    g = RestartGuard(["Plants absorb carbon dioxide", " (CO2) and convert it into"])
    out = "".join(g.feed(d) for d in ("(CO2)", " and convert", " it into", " sugar.")) + g.finish()
    assert out == " sugar." and g.dropped == len("(CO2) and convert it into")


def test_restart_guard_releases_a_genuine_continuation_unchanged():
    g = RestartGuard(["The cat sat.", " The dog ran."])
    # it begins like the answer and like the last round, then diverges: nothing is dropped
    out = [g.feed(d) for d in (" The", " do", "g barked", " twice.")]
    assert out == ["", "", " The dog barked", " twice."] and g.dropped == 0
    assert RestartGuard([]).feed("The cat") == "The cat"  # round 0: nothing to repeat


def test_restart_guard_keeps_nothing_of_a_round_that_only_repeated():
    g = RestartGuard(["A spider has eight legs."])
    assert g.feed("A spider has") == "" and g.finish() == "" and g.text == ""
    blank = RestartGuard(["Paris."])
    assert blank.feed("\n\n") == "" and blank.finish() == "\n\n"  # whitespace is not a repetition


class ScriptedAggregator(FakeLLM):
    """Proposers as in FakeLLM; the aggregator writes ``script[i]`` (words, finish) in round i."""

    def __init__(self, proposers: dict[str, Proposer], script: list[tuple[list[str], str]]) -> None:
        super().__init__(proposers)
        self.script = script

    async def __call__(self, node: Node, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        if node.id != "agg":
            async for c in super().__call__(node, request):
                yield c
            return
        self.requests.append((node.id, request))
        out, finish = self.script[len(agg_prompts(self)) - 1]
        for w in out[: request.max_tokens]:
            await asyncio.sleep(0)
            yield GenerationChunk(rid=request.rid, text=w)
        yield GenerationChunk(rid=request.rid, finish_reason=finish,
                              usage=Usage(prompt_tokens=10, completion_tokens=len(out)))


async def test_an_aggregator_that_ended_its_answer_writes_no_further_round():
    # round 0 ends with the model's end of turn although the proposers go on: that is the answer
    never = asyncio.Event()
    llm = ScriptedAggregator({f"p0.{i}": Proposer(words("a", 9), {6: never}) for i in range(3)},
                             [([" Paris."], "stop"), ([" Paris", " again."], "stop")])
    rec = Recorder()
    result = await PipelineExecutor(spec(aggregator_chunk_tokens=4), llm, rec).run()
    assert result["answer"] == " Paris." and result["rounds"] == 1 and result["stop_reason"] == "finished"
    assert len(agg_prompts(llm)) == 1 and [(r["final"], r["finish"]) for r in rec.rounds] == [(False, "stop")]
    assert sorted(set(llm.closed)) == ["p0.0", "p0.1", "p0.2"]  # the proposers still streaming were closed


async def test_a_round_that_starts_over_is_dropped_from_the_answer_and_the_next_prompt():
    llm = ScriptedAggregator({f"p0.{i}": Proposer(words("a", 4)) for i in range(3)},
                             [([" The", " capital"], "length"),
                              ([" The", " capital", " is", " Paris."], "stop")])
    rec = Recorder()
    result = await PipelineExecutor(spec(), llm, rec).run()
    assert result["answer"] == " The capital is Paris." == "".join(t for _, t in rec.deltas)
    assert [r["restart_chars"] for r in rec.rounds] == [0, len(" The capital")]
    assert result["rounds"] == 2


async def test_a_middle_layer_agent_that_ended_its_answer_ends_its_output():
    llm = ScriptedAggregator({f"p0.{i}": Proposer(words("a", 6)) for i in range(2)}, [([" done."], "stop")])
    mid_rounds: list[int] = []

    async def call(node: Node, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        if node.id == "p1.0":  # the middle agent: a complete answer in its first round
            mid_rounds.append(1)
            yield GenerationChunk(rid=request.rid, text=" m0")
            yield GenerationChunk(rid=request.rid, finish_reason="stop", usage=Usage(prompt_tokens=5,
                                                                                      completion_tokens=1))
            return
        async for c in llm(node, request):
            yield c

    s = spec(layers=[{"agents": [{}, {}]}, {"agents": [{}]}])
    result = await PipelineExecutor(s, call, Recorder()).run()
    assert mid_rounds == [1] and result["agents"]["p1.0"]["status"] == "finished"
    assert " m0" in agg_prompts(llm)[0][0]["content"] and "[...]" not in agg_prompts(llm)[0][0]["content"]
    assert result["answer"] == " done."


def test_prefix_continuation_ends_each_later_round_with_the_open_answer_so_far():
    conv = Conversation("Q?", "Synthesize.", 2, prefix=True)
    conv.add_round(["a0", "b0"], [False, False]).output = "X0"
    m1 = conv.messages()
    assert len(m1) == 2 and not conv.continues  # round 0: the classic prompt, nothing to continue
    conv.add_round(["a1", ""], [True, False]).output = "X1"
    m2 = conv.messages()
    assert m2[:2] == m1 and conv.continues
    assert m2[2]["role"] == "user" and m2[2]["content"].startswith("More of the responses arrived.\n\nResponse 1")
    assert "Continue your answer" not in m2[2]["content"]  # nothing to ask: the model goes on with its text
    assert m2[3] == {"role": "assistant", "content": "X0"} and len(m2) == 4
    conv.add_round(["", "b1"], [True, True])
    m3 = conv.messages()
    assert m3[:3] == m2[:3] and m3[3]["role"] == "user" and m3[4] == {"role": "assistant", "content": "X0X1"}
    empty = Conversation("Q?", "S.", 1, prefix=True)
    empty.add_round(["a"], [False]).output = ""
    empty.add_round(["b"], [True])
    assert not empty.continues and empty.messages()[-1]["role"] == "user"  # no answer yet: a fresh turn


async def test_prefix_continuation_asks_the_engine_to_continue_the_final_message():
    llm = FakeLLM({f"p0.{i}": Proposer(words("a", 6)) for i in range(3)}, agg_tokens=30)
    result = await PipelineExecutor(spec(continuation="prefix"), llm, Recorder()).run()
    calls = [r for nid, r in llm.requests if nid == "agg"]
    assert len(calls) >= 2 and result["rounds"] == len(calls)
    assert calls[0].extra_body == {} and calls[0].messages[-1]["role"] == "user"
    for c in calls[1:]:
        assert c.extra_body == {"continue_final_message": True} and c.messages[-1]["role"] == "assistant"
    assert calls[-1].messages[-1]["content"] == result["answer"][: len(calls[-1].messages[-1]["content"])]
    with pytest.raises(ValueError):
        spec(continuation="rewrite")


def test_auto_continuation_is_prefix_only_where_every_aggregating_backend_continues():
    """``continuation: auto`` (the default): ``prefix`` when every backend an aggregating agent
    may use honours ``continue_final_message``; a proposer of layer 0 aggregates nothing, so its
    backend does not count; an aggregator that names no backend may run on any."""
    from types import SimpleNamespace

    from agents.pipeline import continuation_for
    from scheduler.backends.openai_compat import OpenAICompatBackend
    from scheduler.backends.sglang import SGLangBackend
    from scheduler.local.engine import LocalEngine

    assert SGLangBackend.continues_final_message and LocalEngine.continues_final_message
    assert not OpenAICompatBackend.continues_final_message
    backends = {"sgl": SimpleNamespace(continues_final_message=True),
                "oai": SimpleNamespace(continues_final_message=False)}
    assert spec().continuation == "auto"
    assert continuation_for(spec(), backends) == "turn"  # the aggregator may land on "oai"
    assert continuation_for(spec(aggregator={"backend": "sgl"}), backends) == "prefix"
    assert continuation_for(spec(aggregator={"backend": "sgl"}, layers=[{"agents": [{"backend": "oai"}]}]),
                            backends) == "prefix"  # layer 0 only proposes
    two_layers = [{"agents": [{"backend": "sgl"}]}, {"agents": [{"backend": "oai"}]}]
    assert continuation_for(spec(aggregator={"backend": "sgl"}, layers=two_layers), backends) == "turn"
    assert continuation_for(spec(aggregator={"backend": "oai"}, continuation="prefix"), backends) == "prefix"
    assert continuation_for(spec(aggregator={"backend": "sgl"}, continuation="turn"), backends) == "turn"
    assert continuation_for(spec(), {"sgl": backends["sgl"]}) == "prefix"

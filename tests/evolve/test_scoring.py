"""Confidence scoring: once per candidate, in the context that wrote it (the Squeeze-Evolve
reference's ``_score_population``), cached with the candidate and reused by every group it joins.

A fake ``Calls`` whose tokens are characters, so the prefix counts and ``logprob_start_len`` are
exact and checkable; its scorer's confidence is a hash of the whole scored prompt, so a value
computed in any other context than the expected one would not match."""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

import pytest

from evolve.engine import TAIL_SLACK_TOKENS, Evolution, shared_prefix
from evolve.extract import ANSWER_INSTRUCTIONS
from evolve.operators import aggregate_prompt, default_operators, initial_prompt
from evolve.spec import input_model
from scheduler.backends.base import Generation, TokenLogprob, Usage

Spec = input_model(default_operators())
Q = "What is 6 times 7?"
INSTRUCTION = ANSWER_INSTRUCTIONS["integer"]


def conf(prompt: str) -> float:
    """The fake scorer's confidence of everything it is shown: a hash of the whole prompt."""
    return 1.0 + (zlib.crc32(prompt.encode()) % 1000) / 250


class FakeCalls:
    def __init__(self) -> None:
        self.log: list[tuple[str, str, int]] = []  # (kind, prompt or model, start)

    def render(self, model: Any, messages: list[dict[str, str]]) -> str:
        return "<user>" + messages[0]["content"] + "<assistant>"

    async def generate(self, model: Any, problem: int, messages: list[dict[str, str]], seed: int) -> Generation:
        await asyncio.sleep(0)
        self.log.append(("generate", model.name, 0))
        answer = "42" if seed % 3 else str(seed % 50)
        return Generation(rid="g", text=f" {model.name} thinks ({seed}). So the answer is \\boxed{{{answer}}}.",
                          finish_reason="stop", usage=Usage(prompt_tokens=10, completion_tokens=10))

    async def count(self, model: Any, problem: int, prompt: str) -> Generation:
        self.log.append(("count", prompt, 0))
        return Generation(rid="c", text="", finish_reason="length", usage=Usage(prompt_tokens=len(prompt)))

    async def score(self, model: Any, problem: int, prompt: str, top_k: int, start: int = 0) -> Generation:
        await asyncio.sleep(0)
        self.log.append(("score", prompt, start))
        c = conf(prompt)
        rows = [TokenLogprob(token=ch, logprob=-c, top=[(ch, -c)]) for ch in prompt[start:]]
        return Generation(rid="s", text="", finish_reason="length", prompt_logprobs=rows,
                          usage=Usage(prompt_tokens=len(prompt), completion_tokens=1))

    def take(self, kind: str) -> list[tuple[str, str, int]]:
        out = [x for x in self.log if x[0] == kind]
        return out


def spec(**over: Any) -> Any:
    base = {"problems": [{"question": Q, "answer": "42"}],
            "models": [{"name": "big", "price_in": 3, "price_out": 15},
                       {"name": "small", "price_in": 0.1, "price_out": 0.4, "prompt_logprobs": True}],
            "population": 6, "k": 3, "groups": 6, "loops": 3, "percentiles": [50], "lite_fraction": 0.5,
            "seed": 5}
    return Spec(**(base | over))


async def run_all(s: Any, calls: FakeCalls) -> list[dict[str, Any]]:
    evo = Evolution(s, default_operators(), calls)
    outs = [await evo.initial()]
    for t in range(1, s.loops):
        calls.log.append(("loop", str(t), 0))
        outs.append(await evo.step(t, outs[-1]["populations"]))
    return outs


def split(log: list[tuple[str, str, int]]) -> list[list[tuple[str, str, int]]]:
    parts: list[list[tuple[str, str, int]]] = [[]]
    for x in log:
        if x[0] == "loop":
            parts.append([])
        else:
            parts[-1].append(x)
    return parts


async def test_each_candidate_is_scored_once_in_the_context_that_wrote_it():
    calls = FakeCalls()
    outs = await run_all(spec(), calls)
    per_loop = split(calls.log)
    initial = calls.render(None, initial_prompt(Q, INSTRUCTION))

    # loop 0: six candidates after the one initial prompt: one count of it, six passes from its end
    pop0 = outs[0]["populations"][0]
    assert [c["confidence"] for c in pop0] == pytest.approx([conf(initial + c["text"]) for c in pop0])
    assert [x for x in per_loop[0] if x[0] == "count"] == [("count", initial, 0)]
    scores0 = [x for x in per_loop[0] if x[0] == "score"]
    assert len(scores0) == 6 and {x[2] for x in scores0} == {len(initial) - TAIL_SLACK_TOKENS}

    # loop 1: group fitness is the mean of the members' cached values: no pass scores a loop-0 candidate
    routing = outs[1]["routing"][0]
    want = [sum(pop0[i]["confidence"] for i in g) / len(g) for g in routing["groups"]]
    assert routing["fitness"] == pytest.approx(want)
    assert not any(x[1].endswith(c["text"]) for x in per_loop[1] if x[0] == "score" for c in pop0)
    # its new candidates are scored in their own group's recombination prompt, once each; a lite
    # one is a member carried forward and keeps that member's value (no pass)
    pop1 = outs[1]["populations"][0]
    contexts = {}
    for g, (tier, cand) in enumerate(zip(routing["tiers"], pop1, strict=True)):
        if tier == -1:
            chosen = next(pop0[i] for i in routing["groups"][g] if pop0[i]["text"] == cand["text"])
            assert cand["confidence"] == chosen["confidence"] and cand["model"] == "lite"
        else:
            context = calls.render(None, aggregate_prompt(Q, [pop0[i]["text"] for i in routing["groups"][g]],
                                                          INSTRUCTION))
            contexts[g] = context
            assert cand["confidence"] == pytest.approx(conf(context + cand["text"]))
    scores1 = [x for x in per_loop[1] if x[0] == "score"]
    assert 0 < len(scores1) == len(contexts) < 6  # lite 0.5 took at least one group
    # one count per problem and loop, of the beginning all its contexts share; every pass starts
    # there (less the slack), before its own candidate
    texts = list(contexts.values())
    shared = next(texts[0][:n] for n in range(len(texts[0]), -1, -1)
                  if all(t.startswith(texts[0][:n]) for t in texts))
    assert [x for x in per_loop[1] if x[0] == "count"] == [("count", shared, 0)]
    assert {x[2] for x in scores1} == {len(shared) - TAIL_SLACK_TOKENS}
    assert shared.startswith("<user>Problem:\n" + Q)

    # loop 2 is the last: its candidates are never grouped, so never scored
    assert not [x for x in per_loop[2] if x[0] in ("score", "count")]
    assert all("confidence" not in c for c in outs[2]["populations"][0] if c["model"] != "lite")
    assert outs[2]["routing"][0]["fitness"] == pytest.approx(
        [sum(pop1[i]["confidence"] for i in g) / len(g) for g in outs[2]["routing"][0]["groups"]])

    # the ledger counts exactly the passes made: 6 + 1 in loop 0, len(contexts) + 1 in loop 1
    assert [o["ledger"]["models"].get("small", {}).get("scoring_calls", 0) for o in outs] == [7, len(contexts) + 1, 0]
    assert outs[0]["scoring_busy_s"] > 0 and outs[2]["scoring_busy_s"] == 0


async def test_scores_and_routes_are_deterministic():
    a, b = await run_all(spec(), FakeCalls()), await run_all(spec(), FakeCalls())
    assert [o["populations"] for o in a] == [o["populations"] for o in b]
    assert [o["routing"] for o in a] == [o["routing"] for o in b]


async def test_whole_prompt_logprobs_without_tail_only_give_the_same_values():
    calls = FakeCalls()
    outs = await run_all(spec(score_tail_only=False), calls)
    assert not calls.take("count") and {x[2] for x in calls.take("score")} == {0}
    tail = await run_all(spec(), FakeCalls())
    assert [o["populations"] for o in outs] == [o["populations"] for o in tail]


async def test_accumulate_reuses_old_scores_and_diversity_scores_nothing():
    calls = FakeCalls()
    outs = await run_all(spec(update="accumulate", lite_fraction=0.0), calls)
    # loop 0's six and loop 1's six are each scored once, though loop 2 groups all twelve
    assert len(calls.take("score")) == 12 and len(outs[2]["routing"][0]["fitness"]) == 6
    calls = FakeCalls()
    await run_all(spec(fitness="diversity"), calls)
    assert not calls.take("score") and not calls.take("count")


async def test_a_candidate_without_a_score_is_scored_once_after_the_initial_prompt():
    # a population from a checkpoint written before scores were kept with candidates
    s = spec(k=3, population=3, groups=4, loops=3)
    calls = FakeCalls()
    evo = Evolution(s, default_operators(), calls)
    old = [{"text": f" attempt {i}. So the answer is \\boxed{{4{i}}}.", "answer": f"4{i}", "model": "big", "loop": 0}
           for i in range(3)]
    out = await evo.step(1, [old])
    initial = calls.render(None, initial_prompt(Q, INSTRUCTION))
    fallback = [x for x in calls.log if x[0] == "score" and x[1].startswith(initial)]
    # every group holds all three (k = population), yet each is scored once, all prompt logprobs asked
    assert sorted(x[1] for x in fallback) == sorted(initial + c["text"] for c in old)
    assert {x[2] for x in fallback} == {0}
    assert out["routing"][0]["fitness"] == pytest.approx([sum(conf(initial + c["text"]) for c in old) / 3] * 4)


def test_shared_prefix_is_the_longest_common_beginning():
    assert shared_prefix(["<u>Problem: x\nA", "<u>Problem: x\nB", "<u>Problem: y"]) == "<u>Problem: "
    assert shared_prefix(["abc"]) == "abc" and shared_prefix([]) == "" and shared_prefix(["ab", "b"]) == ""
    assert shared_prefix(["abc", "ab"]) == "ab"


def test_percentiles_may_come_in_any_order_and_are_kept_sorted():
    three = [{"name": "a", "price_in": 3}, {"name": "b", "price_in": 2}, {"name": "c", "prompt_logprobs": True}]
    s = Spec(problems=[{"question": Q}], models=three, percentiles=[70, 20])
    assert s.percentiles == [20, 70] and s.boundaries() == [20, 70]
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        Spec(problems=[{"question": Q}], models=three, percentiles=[20, 170])

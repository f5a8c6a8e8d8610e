"""One evolve run's loops, independent of where the model calls go.

``Evolution`` turns a spec into loop results (plain JSON: populations, routing, ledger,
timing) through a ``Calls`` object that performs model calls; the workflow gives it calls
through the scheduler runtime and checkpoints each result, tests can give it anything. Loops
are deterministic functions of the spec's seed, the populations and the model replies: every
random choice comes from a generator seeded by (seed, problem, loop).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from typing import Any, Protocol
from collections.abc import Sequence

from evolve.fitness import candidate_confidence
from evolve.ledger import Ledger, Price
from evolve.operators import Candidate, Messages, Operators, initial_prompt, synthesize_prompt
from evolve.extract import ANSWER_INSTRUCTIONS
from evolve.routing import LITE, route
from evolve.spec import EvolveInput, ModelSpec
from scheduler.backends.base import Generation


class Calls(Protocol):
    async def generate(self, model: ModelSpec, problem: int, messages: Messages, seed: int) -> Generation: ...

    async def score(self, model: ModelSpec, problem: int, prompt: str, top_k: int,
                    start: int = 0) -> Generation: ...

    async def count(self, model: ModelSpec, problem: int, prompt: str) -> Generation: ...

    def render(self, model: ModelSpec, messages: Messages) -> str: ...


# Tokens before the prefix's end that a tail-only scoring pass still asks for: a tokenizer may
# merge the prefix's last characters with the candidate's first, shifting the boundary.
TAIL_SLACK_TOKENS = 4


def shared_prefix(texts: Sequence[str]) -> str:
    """The longest string every one of ``texts`` begins with ("" for none)."""
    if not texts:
        return ""
    lo, hi = min(texts), max(texts)  # the most different pair bounds what all share
    n = 0
    while n < len(lo) and lo[n] == hi[n]:
        n += 1
    return lo[:n]


def derived_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=4).digest(), "big") & 0x7FFFFFFF


class BusyTimer:
    """Wall time during which at least one model call was in flight (the rest is orchestration)."""

    def __init__(self) -> None:
        self.inflight = 0
        self.busy_s = 0.0
        self._since = 0.0

    def __enter__(self) -> None:
        if self.inflight == 0:
            self._since = time.perf_counter()
        self.inflight += 1

    def __exit__(self, *_exc: object) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.busy_s += time.perf_counter() - self._since


class _Loop:
    """The per-loop state the operators' environments reach: ledger, timer, models."""

    def __init__(self, evo: Evolution, index: int) -> None:
        self.evo = evo
        self.index = index
        self.ledger = Ledger()
        self.timer = BusyTimer()
        self.scoring_timer = BusyTimer()  # wall time with a scoring pass or prefix count in flight
        self._prefix_tokens: dict[tuple[int, str], asyncio.Future[int]] = {}
        self._shared: dict[int, str] = {}
        self._unscored: dict[int, asyncio.Future[float]] = {}

    async def generate(self, model: ModelSpec, problem: int, messages: Messages, seed: int) -> Generation:
        with self.timer:
            gen = await self.evo.calls.generate(model, problem, messages, seed)
        self.ledger.generation(model.name, gen.usage, self.evo.prices[model.name])
        return gen

    def share_context(self, problem: int, prefixes: Sequence[str]) -> None:
        """The rendered scoring contexts of the candidates this loop writes for ``problem``: their
        longest shared beginning is counted once, and every pass then asks only for the logprobs
        from there on (loop 0: the whole initial prompt; a recombination loop: the prompt up to
        the group listing)."""
        self._shared[problem] = shared_prefix(prefixes)

    async def score_written(self, problem: dict[str, Any], prefix: str, candidate: Candidate) -> float:
        """A candidate's confidence in the context that wrote it (``prefix``, rendered for the
        scorer), computed once, when it is written: the reference's C(tau), and what every later
        group it joins reuses."""
        p = problem["index"]
        scorer = self.evo.scorer
        assert scorer is not None
        start = 0
        shared = self._shared.get(p, "")
        if self.evo.spec.score_tail_only and shared and prefix.startswith(shared):
            key = (p, shared)
            if key not in self._prefix_tokens:
                self._prefix_tokens[key] = asyncio.ensure_future(self._count(scorer, p, shared))
            start = max(0, await self._prefix_tokens[key] - TAIL_SLACK_TOKENS)
        return await self._score(p, prefix, candidate["text"], start)

    async def confidence(self, problem: dict[str, Any], candidate: Candidate) -> float:
        """The candidate's cached confidence. One without (a population checkpointed by an earlier
        version, or written by a plug-in) is scored once in this loop, after the problem's
        initial prompt, with every prompt logprob asked for (that context shares no counted
        beginning)."""
        if "confidence" in candidate:
            return float(candidate["confidence"])
        key = id(candidate)
        if key not in self._unscored:
            evo = self.evo
            assert evo.scorer is not None
            prefix = evo.calls.render(evo.scorer, initial_prompt(problem["question"], evo.instruction))
            self._unscored[key] = asyncio.ensure_future(self._score(problem["index"], prefix, candidate["text"], 0))
        return await self._unscored[key]

    async def _score(self, problem: int, prefix: str, text: str, start: int) -> float:
        evo = self.evo
        scorer = evo.scorer
        assert scorer is not None
        with self.timer, self.scoring_timer:
            gen = await evo.calls.score(scorer, problem, prefix + text, evo.spec.top_k, start)
        self.ledger.scoring(scorer.name, gen.usage, evo.prices[scorer.name])
        if not gen.prompt_logprobs:
            raise RuntimeError(f"model {scorer.name!r} returned no prompt logprobs; it cannot score confidence")
        return candidate_confidence(gen.prompt_logprobs, text, evo.spec.top_k)

    async def _count(self, scorer: ModelSpec, problem: int, prefix: str) -> int:
        with self.timer, self.scoring_timer:
            gen = await self.evo.calls.count(scorer, problem, prefix)
        self.ledger.scoring(scorer.name, gen.usage, self.evo.prices[scorer.name])
        return gen.usage.prompt_tokens

    def extract(self, text: str) -> str | None:
        return self.evo.extract(text)

    async def synthesize(self, problem: dict[str, Any], population: list[Candidate]) -> str:
        evo = self.evo
        messages = synthesize_prompt(problem["question"], [c["text"] for c in population], evo.instruction)
        gen = await self.generate(evo.models[0], problem["index"], messages,
                                  derived_seed(evo.spec.seed, problem["index"], "final"))
        self.ledger.routed(evo.models[0].name)
        return gen.text


class Evolution:
    def __init__(self, spec: EvolveInput, ops: Operators, calls: Calls) -> None:
        self.spec = spec
        self.ops = ops
        self.calls = calls
        self.models = spec.ordered_models()
        self.prices = {m.name: Price(m.price_in, m.price_out) for m in self.models}
        self.scorer = spec.scoring_model()
        self.problems: list[dict[str, Any]] = [
            {"index": i, "id": p.id or str(i), "question": p.question, "answer": p.answer}
            for i, p in enumerate(spec.problems)]
        self.instruction = ANSWER_INSTRUCTIONS.get(spec.answer_format, ANSWER_INSTRUCTIONS["boxed"])
        self.extract = ops.get("extractor", spec.answer_format)
        self._recombine = ops.get("recombination", spec.recombination)
        self.routed = len(self.models) > 1 or spec.lite_fraction > 0
        # a fitness operator marked ``scores_candidates`` reads each candidate's confidence, which
        # is then computed once, when the candidate is written, and kept with it
        self.scores_candidates = (self.routed and self.scorer is not None
                                  and bool(getattr(ops.get("fitness", spec.fitness), "scores_candidates", False)))

    def will_score(self, loop: int) -> bool:
        """Whether the candidates loop ``loop`` writes get a confidence: only when a later loop
        groups them (the last loop's never are)."""
        return self.scores_candidates and loop < self.spec.loops - 1

    def render_for_scorer(self, messages: Messages) -> str:
        assert self.scorer is not None
        return self.calls.render(self.scorer, messages)

    def recombine(self, question: str, texts: Sequence[str]) -> Messages:
        return self._recombine(question, list(texts), self.instruction)

    def _candidate(self, gen: Generation, model: str, loop: int) -> Candidate:
        return {"text": gen.text, "answer": self.extract(gen.text), "model": model, "loop": loop}

    # ---- loop 0 ------------------------------------------------------------------------------

    async def initial(self) -> dict[str, Any]:
        """The strongest model writes N candidates per problem."""
        lp = _Loop(self, 0)
        strong = self.models[0]
        t0 = time.perf_counter()
        score = self.will_score(0)
        prompts = {p["index"]: initial_prompt(p["question"], self.instruction) for p in self.problems}
        rendered = {i: self.render_for_scorer(m) for i, m in prompts.items()} if score else {}
        for i, prefix in rendered.items():
            lp.share_context(i, [prefix])

        async def one(problem: dict[str, Any], i: int) -> Candidate:
            gen = await lp.generate(strong, problem["index"], prompts[problem["index"]],
                                    derived_seed(self.spec.seed, problem["index"], 0, i))
            cand = self._candidate(gen, strong.name, 0)
            if score:
                cand["confidence"] = await lp.score_written(problem, rendered[problem["index"]], cand)
            return cand

        populations = await asyncio.gather(*(
            asyncio.gather(*(one(p, i) for i in range(self.spec.population))) for p in self.problems))
        lp.ledger.routed(strong.name, self.spec.population * len(self.problems))
        routes = {m.name: 0 for m in self.models} | {"lite": 0}
        routes[strong.name] = self.spec.population * len(self.problems)
        return self._result(lp, [list(p) for p in populations], routes, [], t0)

    # ---- later loops -------------------------------------------------------------------------

    async def step(self, index: int, populations: list[list[Candidate]]) -> dict[str, Any]:
        lp = _Loop(self, index)
        t0 = time.perf_counter()
        outcomes = await asyncio.gather(*(self._problem_step(lp, p, populations[p["index"]]) for p in self.problems))
        routes = {m.name: 0 for m in self.models} | {"lite": 0}
        for _, routing in outcomes:
            for tier in routing["tiers"]:
                routes["lite" if tier == LITE else self.models[tier].name] += 1
        for tier, n in routes.items():
            if n:
                lp.ledger.routed(tier, n)
        return self._result(lp, [pop for pop, _ in outcomes], routes, [r for _, r in outcomes], t0)

    async def _problem_step(self, lp: _Loop, problem: dict[str, Any],
                            population: list[Candidate]) -> tuple[list[Candidate], dict[str, Any]]:
        spec, p = self.spec, problem["index"]
        rng = random.Random(f"{spec.seed}:{p}:{lp.index}:select")
        select = self.ops.get("selection", spec.selection)
        members = select(population, spec.group_count(), spec.k, rng, spec.selection_temperature)
        groups = [[population[i] for i in g] for g in members]
        if self.routed:
            fitness = list(await self.ops.get("fitness", spec.fitness)(lp, problem, groups))
            routing = route(fitness, len(self.models), spec.boundaries(), spec.lite_fraction)
            tiers, thresholds = routing.tiers, routing.thresholds
        else:
            fitness, tiers, thresholds = [], [0] * len(groups), []
        lite_rng = random.Random(f"{spec.seed}:{p}:{lp.index}:lite")
        lite = self.ops.get("lite", spec.lite_method)
        picks = {g: lite(groups[g], lite_rng) for g, tier in enumerate(tiers) if tier == LITE}
        prompts = {g: self.recombine(problem["question"], [c["text"] for c in groups[g]])
                   for g, tier in enumerate(tiers) if tier != LITE}
        score = self.will_score(lp.index)
        rendered = {g: self.render_for_scorer(m) for g, m in prompts.items()} if score else {}
        if rendered:
            lp.share_context(p, list(rendered.values()))

        async def produce(g: int, tier: int) -> Candidate:
            if tier == LITE:
                # the member carried forward is the same candidate: it keeps its confidence
                chosen = groups[g][picks[g]]
                return {**chosen, "model": "lite", "loop": lp.index, "from_model": chosen.get("model")}
            model = self.models[tier]
            gen = await lp.generate(model, p, prompts[g], derived_seed(spec.seed, p, lp.index, g))
            cand = self._candidate(gen, model.name, lp.index)
            if score:
                cand["confidence"] = await lp.score_written(problem, rendered[g], cand)
            return cand

        new = list(await asyncio.gather(*(produce(g, t) for g, t in enumerate(tiers))))
        updated = self.ops.get("update", spec.update)(population, new)
        return updated, {"groups": members, "fitness": fitness, "thresholds": thresholds, "tiers": tiers}

    # ---- final answer ------------------------------------------------------------------------

    async def final(self, populations: list[list[Candidate]]) -> dict[str, Any]:
        lp = _Loop(self, -1)
        t0 = time.perf_counter()
        pick = self.ops.get("final", self.spec.final)
        answers = await asyncio.gather(*(pick(lp, p, populations[p["index"]]) for p in self.problems))
        out = []
        for problem, a in zip(self.problems, answers, strict=True):
            row = {"id": problem["id"], **a}
            if problem["answer"] is not None:
                truth = self.extract(problem["answer"]) or problem["answer"].strip()
                row["correct"] = a.get("answer") == truth
            out.append(row)
        return {"answers": out, "ledger": lp.ledger.to_dict(), "wall_s": time.perf_counter() - t0,
                "model_busy_s": lp.timer.busy_s}

    def _result(self, lp: _Loop, populations: list[list[Candidate]], routes: dict[str, int],
                routing: list[dict[str, Any]], t0: float) -> dict[str, Any]:
        values = [f for r in routing for f in r["fitness"]]
        summary = ({"min": min(values), "mean": sum(values) / len(values), "max": max(values)} if values else None)
        return {"loop": lp.index, "populations": populations, "routes": routes, "lite": routes.get("lite", 0),
                "routing": routing, "fitness": summary, "ledger": lp.ledger.to_dict(),
                "wall_s": time.perf_counter() - t0, "model_busy_s": lp.timer.busy_s,
                "scoring_busy_s": lp.scoring_timer.busy_s}

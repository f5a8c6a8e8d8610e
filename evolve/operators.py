"""The pluggable operators of an evolve run, looked up by name in an ``Operators`` registry.

Kinds and their signatures (``Candidate`` is a JSON dict: ``text``, ``answer``, ``model``, ``loop``,
and ``confidence`` once scored):

- ``selection(population, groups, k, rng, temperature) -> list[list[int]]``: which candidates
  form each group (indices into the population, without repetition inside a group);
- ``recombination(question, texts, instruction) -> messages``: the prompt that turns a group
  into one new candidate (also the context that candidate's confidence is scored in);
- ``fitness``: async ``(env, problem, groups) -> list[float]``, higher = more confident; one
  with the attribute ``scores_candidates = True`` has every candidate scored once, when it is
  written, and reads the value with ``await env.confidence(problem, candidate)``;
- ``update(population, new) -> population``;
- ``lite(group, rng) -> int``: which member of a lite-routed group is carried forward;
- ``final``: async ``(env, problem, population) -> {"answer", "text", ...}``;
- ``extractor(text) -> str | None``.

A service that wants its own operator builds ``default_operators()``, adds to it, and registers
the workflow with it (``evolve.workflow.register(registry, operators)``): nothing is global.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from evolve.extract import BUILTIN_EXTRACTORS

Candidate = dict[str, Any]
Messages = list[dict[str, str]]

KINDS = ("fitness", "selection", "recombination", "update", "lite", "final", "extractor")


class Operators:
    def __init__(self) -> None:
        self._ops: dict[str, dict[str, Any]] = {k: {} for k in KINDS}

    def add(self, kind: str, name: str, fn: Any) -> None:
        if kind not in self._ops:
            raise ValueError(f"unknown operator kind {kind!r}; kinds: {', '.join(KINDS)}")
        self._ops[kind][name] = fn

    def get(self, kind: str, name: str) -> Any:
        try:
            return self._ops[kind][name]
        except KeyError:
            raise KeyError(f"no {kind} operator {name!r}; known: {', '.join(self.names(kind))}") from None

    def names(self, kind: str) -> list[str]:
        return sorted(self._ops[kind])


# ---- selection -----------------------------------------------------------------------------

def vote_shares(population: Sequence[Candidate]) -> list[float]:
    """Each candidate's share of the population that states the same answer (0 with no answer):
    the per-candidate fitness that needs no model call."""
    counts = Counter(c.get("answer") for c in population if c.get("answer") is not None)
    n = len(population)
    return [counts[c["answer"]] / n if c.get("answer") is not None else 0.0 for c in population]


def select_uniform(population: Sequence[Candidate], groups: int, k: int, rng: random.Random,
                   temperature: float = 1.0) -> list[list[int]]:
    n = len(population)
    return [rng.sample(range(n), min(k, n)) for _ in range(groups)]


def select_softmax(population: Sequence[Candidate], groups: int, k: int, rng: random.Random,
                   temperature: float = 1.0) -> list[list[int]]:
    """Without replacement inside a group, each draw weighted by softmax(vote share / temperature)."""
    scores = vote_shares(population)
    top = max(scores) if scores else 0.0
    weights = [math.exp((s - top) / max(temperature, 1e-6)) for s in scores]
    out = []
    for _ in range(groups):
        left = list(range(len(population)))
        w = list(weights)
        group = []
        for _ in range(min(k, len(population))):
            i = rng.choices(range(len(left)), weights=w)[0]
            group.append(left.pop(i))
            w.pop(i)
        out.append(group)
    return out


# ---- recombination prompts -----------------------------------------------------------------

def initial_prompt(question: str, instruction: str) -> Messages:
    return [{"role": "user", "content": f"{question}\n\nSolve the problem step by step. {instruction}"}]


def _listing(texts: Sequence[str]) -> str:
    return "\n\n".join(f"Candidate solution {i + 1}:\n{t.strip()}" for i, t in enumerate(texts))


def aggregate_prompt(question: str, texts: Sequence[str], instruction: str) -> Messages:
    return [{"role": "user", "content": (
        f"Problem:\n{question}\n\nBelow are candidate solutions written independently; some may be wrong. "
        "Check each one, keep the reasoning that is right, fix the mistakes, and write one complete, "
        f"correct solution. {instruction}\n\n{_listing(texts)}")}]


def synthesize_prompt(question: str, texts: Sequence[str], instruction: str) -> Messages:
    return [{"role": "user", "content": (
        f"Problem:\n{question}\n\nHere are several attempts at this problem. Where they agree, say why the "
        "shared result holds; where they disagree, work out which one is right. Then write a single "
        f"solution that combines their best ideas. {instruction}\n\n{_listing(texts)}")}]


# ---- update --------------------------------------------------------------------------------

def update_replace(population: list[Candidate], new: list[Candidate]) -> list[Candidate]:
    return list(new)


def update_accumulate(population: list[Candidate], new: list[Candidate]) -> list[Candidate]:
    return list(population) + list(new)


# ---- lite tier -----------------------------------------------------------------------------

def lite_majority(group: Sequence[Candidate], rng: random.Random) -> int:
    """The first member stating the group's most common answer (ties: the answer seen first)."""
    answers = [c.get("answer") for c in group]
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return 0
    best = max(counts.values())
    winner = next(a for a in answers if a is not None and counts[a] == best)
    return answers.index(winner)


def lite_random(group: Sequence[Candidate], rng: random.Random) -> int:
    return rng.randrange(len(group))


# ---- final answer --------------------------------------------------------------------------

def majority_answer(population: Sequence[Candidate]) -> tuple[str | None, int, dict[str, int]]:
    """(answer, index of its first candidate, votes per answer); ties go to the answer seen first."""
    answers = [c.get("answer") for c in population]
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None, 0, {}
    best = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == best)
    return winner, answers.index(winner), dict(votes)


async def final_majority(env: Any, problem: dict[str, Any], population: list[Candidate]) -> dict[str, Any]:
    answer, index, votes = majority_answer(population)
    return {"answer": answer, "text": population[index]["text"] if population else "", "votes": votes,
            "method": "majority"}


async def final_synthesize(env: Any, problem: dict[str, Any], population: list[Candidate]) -> dict[str, Any]:
    """The strongest model writes one answer from the final population (``env.synthesize``)."""
    text = await env.synthesize(problem, population)
    _, _, votes = majority_answer(population)
    return {"answer": env.extract(text), "text": text, "votes": votes, "method": "synthesize"}


def default_operators() -> Operators:
    from evolve.fitness import fitness_confidence, fitness_diversity

    ops = Operators()
    tables: dict[str, dict[str, Any]] = {
        "fitness": {"confidence": fitness_confidence, "diversity": fitness_diversity},
        "selection": {"uniform": select_uniform, "softmax": select_softmax},
        "recombination": {"aggregate": aggregate_prompt, "synthesize": synthesize_prompt},
        "update": {"replace": update_replace, "accumulate": update_accumulate},
        "lite": {"majority": lite_majority, "random": lite_random},
        "final": {"majority": final_majority, "synthesize": final_synthesize},
        "extractor": dict(BUILTIN_EXTRACTORS),
    }
    for kind, table in tables.items():
        for name, fn in table.items():
            ops.add(kind, name, fn)
    return ops


SPEC_FIELDS: dict[str, str] = {"fitness": "fitness", "selection": "selection", "recombination": "recombination",
                               "update": "update", "lite_method": "lite", "final": "final",
                               "answer_format": "extractor"}


def check_names(ops: Operators, values: dict[str, str]) -> list[tuple[str, str]]:
    """(spec field, message) for every operator name the registry does not have."""
    bad = []
    for field_name, kind in SPEC_FIELDS.items():
        name = values.get(field_name)
        if name is not None and name not in ops.names(kind):
            bad.append((field_name, f"unknown {kind} {name!r}; known: {', '.join(ops.names(kind))}"))
    return bad



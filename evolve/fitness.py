"""Group fitness: how confident a group of candidates is (higher = more confident).

*Confidence* scores each candidate once, when it is written, with one prefill-only pass on the
scoring model over ``chat_template(the prompt that wrote it) + candidate`` (loop 0: the initial
prompt; later: the recombination prompt of the group it came from), as the Squeeze-Evolve
reference does (``_score_population``): per candidate token, the negated mean of its top-k
prompt logprobs; over the candidate's tokens, their mean. A group's fitness is the mean of its
members' cached values, so a candidate costs one pass however many groups it joins. A peaked
next-token distribution has very negative runner-up logprobs, so a high value means the model
found the text predictable.

*Diversity* is the number of distinct answers in the group, negated so that consensus (one
answer) is the most confident end; it needs no model call, for APIs without logprobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from scheduler.backends.base import TokenLogprob

Candidate = dict[str, Any]


def tail_tokens(entries: Sequence[TokenLogprob], text: str) -> list[TokenLogprob]:
    """The prompt-logprob entries of the tokens that spell the last ``len(text)`` characters.

    The scoring prompt is prefix + candidate; walking back from the end until the tokens'
    text covers the candidate finds its tokens without a tokenizer of our own (a token that
    straddles the boundary counts as the candidate's)."""
    need = len(text)
    taken = 0
    i = len(entries)
    while i > 0 and taken < need:
        i -= 1
        taken += max(1, len(entries[i].token))
    return list(entries[i:])


def token_confidence(entry: TokenLogprob, k: int) -> float:
    top = [lp for _, lp in entry.top[:k]] or [entry.logprob]
    return -sum(top) / len(top)


def candidate_confidence(entries: Sequence[TokenLogprob], text: str, k: int = 20) -> float:
    tokens = tail_tokens(entries, text)
    if not tokens:
        raise ValueError("the scoring pass returned no prompt logprobs for the candidate")
    return sum(token_confidence(t, k) for t in tokens) / len(tokens)


def distinct_answers(group: Sequence[Candidate]) -> int:
    """Distinct stated answers; candidates with no answer count as one more answer ("none")."""
    return len({c.get("answer") for c in group})


class FitnessEnv(Protocol):
    async def confidence(self, problem: dict[str, Any], candidate: Candidate) -> float: ...


async def fitness_confidence(env: FitnessEnv, problem: dict[str, Any], groups: list[list[Candidate]]) -> list[float]:
    """GC(g): the mean of the members' confidences. A candidate's confidence is computed once,
    when it is written (``scores_candidates`` asks the engine to), so a candidate in several
    groups, or carried into a later loop, costs no further scoring pass."""
    import asyncio

    async def one(group: list[Candidate]) -> float:
        scores = await asyncio.gather(*(env.confidence(problem, c) for c in group))
        return sum(scores) / len(scores)

    return list(await asyncio.gather(*(one(g) for g in groups)))


fitness_confidence.scores_candidates = True  # type: ignore[attr-defined]


async def fitness_diversity(env: Any, problem: dict[str, Any], groups: list[list[Candidate]]) -> list[float]:
    return [-float(distinct_answers(g)) for g in groups]

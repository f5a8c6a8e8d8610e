"""Scripted model behaviour: what the simulated model "says", decided when a request arrives.

The engine decides *when* tokens come out; a ``Script`` decides *which*. Every script is a pure
function of the request (and its own seed), so runs are reproducible. Pieces tokenize back to
themselves under ``SimTokenizer`` (1-4 letters with an optional leading space), so the next
turn's prompt, which contains this reply, shares its token prefix with the cached one.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import dataclass, field
from statistics import NormalDist
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

from scheduler.backends.base import ToolCall
from scheduler.sim.tokenizer import SimTokenizer

if TYPE_CHECKING:
    from scheduler.sim.engine import SimRequest

_WORDS = tuple(" " + w for w in (
    "the", "of", "and", "to", "in", "is", "code", "fix", "test", "run", "file", "diff",
    "bug", "err", "ok", "step", "call", "tool", "read", "edit", "path", "line", "so", "now"))


@dataclass(frozen=True)
class Plan:
    """The whole reply: one piece and one token id per output token, with optional logprobs
    (per token, and ``top_logprobs`` alternatives best first) and tool calls."""

    pieces: list[str]
    token_ids: list[int]
    finish_reason: Literal["stop", "length", "tool_calls"]
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[str, float]]] = field(default_factory=list)
    content_tokens: int | None = None  # with tool calls: the visible text before the call's text


class Script(Protocol):
    def plan(self, request: SimRequest) -> Plan: ...


def _hash(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


class _Pieces:
    """Turns pieces into a ``Plan``: ids from one tokenizer, truncation at ``max_new_tokens``."""

    def __init__(self) -> None:
        self.tokenizer = SimTokenizer()

    def words(self, n: int, key: int) -> list[str]:
        return random.Random(key).choices(_WORDS, k=n)

    def plan(self, pieces: list[str], request: SimRequest, reason: Literal["stop", "tool_calls"] = "stop",
             tool_calls: Sequence[ToolCall] = (), logprob: Callable[[int], float] | None = None,
             call_tokens: int = 0) -> Plan:
        final: Literal["stop", "length", "tool_calls"] = reason
        if len(pieces) > request.max_new_tokens or (reason == "stop" and len(pieces) == request.max_new_tokens):
            pieces, final = pieces[: request.max_new_tokens], "length"
        ids = [self.tokenizer.piece_id(p) for p in pieces]
        calls = list(tool_calls) if final == "tool_calls" else []
        content = len(pieces) - call_tokens if calls else None
        if not request.logprobs or logprob is None:
            return Plan(pieces, ids, final, calls, content_tokens=content)
        lps = [logprob(i) for i in range(len(pieces))]
        tops = [[(p, lp)] + [(w, lp - 0.5 * (j + 1)) for j, w in enumerate(self.words(request.top_logprobs, i))]
                for i, (p, lp) in enumerate(zip(pieces, lps, strict=True))]
        return Plan(pieces, ids, final, calls, lps, [t[: request.top_logprobs] for t in tops], content)

    def tool_call(self, name: str, arguments: str, key: int) -> tuple[list[str], ToolCall]:
        text = json.dumps({"name": name, "arguments": json.loads(arguments)})
        return self.tokenizer.split(text), ToolCall(id=f"call_{key % 16**12:012x}", name=name, arguments=arguments)


class PseudoScript:
    """Default: pseudo-words, a length drawn from the prompt and seed (all of
    ``max_new_tokens`` when ``ignore_eos``), deterministic logprobs in (-2, 0], and a tool call
    with ``{}`` arguments when the request forces one (``tool_choice`` ``required`` or named).

    Words are slices of one long pseudo-random text, so a cluster-hour of replies costs no
    per-token Python work."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._p = _Pieces()
        self._pool: list[str] = []
        self._pool_ids: list[int] = []

    def plan(self, request: SimRequest) -> Plan:
        # hash() of ints is stable across processes; the prompt, not the rid, picks the reply
        key = hash((self.seed, -1 if request.seed is None else request.seed, len(request.input_ids),
                    *request.input_ids[-32:])) & (2**62 - 1)
        forced = _forced_tool(request)
        if forced is not None:
            pieces, call = self._p.tool_call(forced, "{}", key)
            return self._p.plan(pieces, request, "tool_calls", [call], call_tokens=len(pieces))
        m = request.max_new_tokens
        n = m if request.ignore_eos else max(1, m // 2 + key % (m // 2 + 1))
        self._grow_pool(4 * n)
        start = key % (len(self._pool) - n)
        pieces = self._pool[start:start + n]
        if request.logprobs:
            return self._p.plan(pieces, request, logprob=lambda i: -(_hash(key, i) % 2000) / 1000)
        reason: Literal["stop", "length"] = "length" if n >= m else "stop"
        return Plan(pieces, self._pool_ids[start:start + n], reason)

    def _grow_pool(self, size: int) -> None:
        if len(self._pool) < size:
            self._pool = self._p.words(max(size, 65536), self.seed)
            self._pool_ids = [self._p.tokenizer.piece_id(p) for p in self._pool]


def _forced_tool(request: SimRequest) -> str | None:
    if not request.tools:
        return None
    choice = request.tool_choice
    if isinstance(choice, dict):
        return str(choice.get("function", {}).get("name"))
    if choice == "required":
        return str(request.tools[0].get("function", {}).get("name"))
    return None


@dataclass(frozen=True)
class Turn:
    """One agent turn of a trace: ``output_tokens`` in all, ending in a tool call or not."""

    output_tokens: int
    tool: str | None = None
    arguments: str = "{}"


class AgentTraceScript:
    """Agent turns from a trace. The turn index is ``meta["turn"]`` when given, else the number
    of assistant messages already in the conversation; past the end, the last turn repeats."""

    def __init__(self, turns: Sequence[Turn], seed: int = 0) -> None:
        if not turns:
            raise ValueError("a trace needs at least one turn")
        self.turns = list(turns)
        self.seed = seed
        self._p = _Pieces()

    def plan(self, request: SimRequest) -> Plan:
        index = request.meta.get("turn")
        if index is None:
            index = sum(1 for m in request.messages or [] if m.get("role") == "assistant")
        turn = self.turns[min(int(index), len(self.turns) - 1)]
        key = _hash(self.seed, request.rid, index)
        if turn.tool is None:
            return self._p.plan(self._p.words(turn.output_tokens, key), request)
        call_pieces, call = self._p.tool_call(turn.tool, turn.arguments, key)
        thinking = self._p.words(max(0, turn.output_tokens - len(call_pieces)), key)
        return self._p.plan(thinking + call_pieces, request, "tool_calls", [call], call_tokens=len(call_pieces))


class TextScript:
    """A given reply (fixed, or computed from the request) with a fixed per-token logprob:
    evolve tests use it to control answers and confidence."""

    def __init__(self, reply: str | Callable[[SimRequest], str], logprob: float = -0.1) -> None:
        self.reply = reply
        self.logprob = logprob
        self._p = _Pieces()

    def plan(self, request: SimRequest) -> Plan:
        text = self.reply(request) if callable(self.reply) else self.reply
        return self._p.plan(self._p.tokenizer.split(text), request, logprob=lambda i: self.logprob)


class ChunkedScript:
    """Text in numbered chunks of exactly ``chunk_tokens`` tokens (``" [k]"`` opens chunk k and
    is 3 tokens), for staircase-pipeline tests that cut a stream at chunk boundaries."""

    def __init__(self, chunk_tokens: int, chunks: int, seed: int = 0) -> None:
        if chunk_tokens < 4:
            raise ValueError("chunk_tokens must be >= 4")
        self.chunk_tokens = chunk_tokens
        self.chunks = chunks
        self.seed = seed
        self._p = _Pieces()

    def plan(self, request: SimRequest) -> Plan:
        key = _hash(self.seed, request.rid)
        pieces: list[str] = []
        for k in range(self.chunks):
            pieces += [" [", str(k % 10), "]"] + self._p.words(self.chunk_tokens - 3, _hash(key, k))
        return self._p.plan(pieces, request)


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def _top_row(confidence: float, k: int) -> list[float]:
    """``k`` logprobs, best first, whose mean is exactly ``-confidence``."""
    if k <= 1:
        return [-confidence]
    return [-confidence * (0.5 + j / (k - 1)) for j in range(k)]


_NEARBY = (-3, -2, -1, 1, 2, 3, 10)  # a careless slip: the offsets of a "nearby" wrong number
_Z_GRID = tuple(NormalDist().inv_cdf((i + 0.5) / 400) for i in range(400))  # N(0, 1) quantiles


def _unit(*parts: object) -> float:
    """A deterministic draw in [0, 1) from ``parts``."""
    return _hash(*parts) / 2**64


def _logistic(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def skill_for_accuracy(accuracy: float, difficulty_sd: float) -> float:
    """The skill s whose mean chance of a right answer, logistic(s - d) over difficulties
    d ~ N(0, ``difficulty_sd``), is ``accuracy``: so ``accuracy`` keeps meaning "the share of
    right answers" however spread the problems' difficulties are."""
    if not 0 < accuracy < 1:
        raise ValueError("accuracy must be within (0, 1) to have a finite skill")
    if difficulty_sd == 0:
        return math.log(accuracy / (1 - accuracy))
    lo, hi = -40.0, 40.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if sum(_logistic(mid - difficulty_sd * z) for z in _Z_GRID) / len(_Z_GRID) < accuracy:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _distractor(truth: str, key: int) -> str:
    """A plausible wrong answer of a problem, the same for every model: a double, a half, or the
    right answer off by a step of 4-30 (never one of the careless slips ``_NEARBY`` gives)."""
    try:
        t = int(truth)
    except ValueError:
        return truth + "!"
    step = 4 + key % 27
    step = 31 if step == 10 else step
    options = [t + step, t - step if t - step >= 0 or t < 0 else t + step + 1, 2 * t]
    if t % 2 == 0:
        options.append(t // 2)
    options = [o for o in options if o != t and o - t not in _NEARBY]
    return str(options[(key >> 8) % len(options)])


class ProblemScript:
    """A model that knows the answers of a problem set, for evolve tests and benchmarks.

    The reply to a prompt that contains one of the questions is some reasoning words and
    ``\\boxed{answer}``. The answer is right with probability p (a hash of seed, prompt and
    request seed decides, so the same call always gets the same reply). Otherwise, when the
    prompt lists candidate answers after the question (a recombination prompt), the model copies
    one of them with probability ``copy``, as a weak aggregator keeps a group's consensus; else it
    makes its own mistake: the problem's *distractor* with probability ``distractor``, otherwise
    a careless slip, a number near the right one (-3..+3 or +10).

    By default p is ``accuracy`` on every problem, errors are independent per call, a model
    shown candidates always copies one when wrong, and wrong answers spread over the slips:
    simple, but a majority vote then converges on the right answer for any accuracy that is not
    tiny. The optional parameters make a harder, more realistic model:

    - ``difficulty_sd`` > 0: each problem has a latent difficulty d ~ N(0, ``difficulty_sd``)
      drawn from a hash of ``difficulty_seed`` and the question (not of ``seed``: two models with
      the same ``difficulty_seed`` find the same problems hard), or given per question in
      ``difficulties``; p = logistic(skill - d). ``skill`` defaults to the value at which the mean
      of p over the difficulty distribution is ``accuracy`` (``skill_for_accuracy``), so
      ``accuracy`` still means the share of right answers.
    - ``distractor`` > 0: a wrong answer is the problem's distractor (a hash of
      ``difficulty_seed`` and the question, or ``distractors[question]``; the same for every
      model) with that probability: a shared plausible mistake on which a vote can converge.
    - ``copy`` < 1: a wrong model shown candidates sometimes makes its own mistake instead.

    Prompt logprobs (prefill-only scoring) make the confidence of a prompt depend on the last
    answer it states, which is the candidate being scored: per prompt token, top-k logprobs
    whose mean is ``-c``, plus up to ``confidence_noise`` / 2 either way (a hash of the prompt).
    c is ``by_answer[answer]`` if listed there; otherwise, with ``confidence_from="truth"`` (the
    default), ``confidence_correct`` for the right answer and ``confidence_wrong`` for any other,
    an oracle on the ground truth; with ``confidence_from="belief"``, ``confidence_wrong +
    (confidence_correct - confidence_wrong) * q``, where q is this model's own probability of
    stating that answer to the bare question (``answer_probability``): right answers score high
    where the model is likely right, and a distractor it shares scores high where it is likely
    wrong, as a real model's likelihood of an answer does."""

    def __init__(self, problems: dict[str, str], accuracy: float, *, seed: int = 0, reasoning_tokens: int = 12,
                 confidence_correct: float = 2.0, confidence_wrong: float = 1.0, confidence_noise: float = 0.0,
                 by_answer: dict[str, float] | None = None, difficulty_sd: float = 0.0, difficulty_seed: int = 0,
                 difficulties: dict[str, float] | None = None, skill: float | None = None,
                 distractor: float = 0.0, distractors: dict[str, str] | None = None, copy: float = 1.0,
                 confidence_from: Literal["truth", "belief"] = "truth") -> None:
        if not 0 <= accuracy <= 1:
            raise ValueError("accuracy must be within [0, 1]")
        for name, value in (("distractor", distractor), ("copy", copy)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be within [0, 1]")
        if difficulty_sd < 0:
            raise ValueError("difficulty_sd must be >= 0")
        if confidence_from not in ("truth", "belief"):
            raise ValueError("confidence_from must be 'truth' or 'belief'")
        self.problems = dict(problems)
        self.accuracy = accuracy
        self.seed = seed
        self.reasoning_tokens = reasoning_tokens
        self.confidence = (confidence_correct, confidence_wrong, confidence_noise)
        self.by_answer = dict(by_answer or {})
        self.difficulty_sd = difficulty_sd
        self.difficulty_seed = difficulty_seed
        self.distractor = distractor
        self.copy = copy
        self.confidence_from = confidence_from
        given = {q: float(v) for q, v in (difficulties or {}).items()}
        self.difficulties = {q: given.get(q, difficulty_sd * NormalDist().inv_cdf(
            (_hash(difficulty_seed, q, "difficulty") % 2**52 + 0.5) / 2**52)) for q in self.problems}
        named = distractors or {}
        self.distractors = {q: str(named.get(q) or _distractor(a, _hash(difficulty_seed, q, "distractor")))
                            for q, a in self.problems.items()}
        # no latent at all: p is ``accuracy`` exactly (the original behaviour, 0 and 1 included)
        self._flat = skill is None and not any(self.difficulties.values())
        if skill is None and not self._flat:
            skill = math.inf if accuracy == 1 else -math.inf if accuracy == 0 else \
                skill_for_accuracy(accuracy, difficulty_sd)
        self.skill = skill
        self._p = _Pieces()

    def find(self, text: str) -> tuple[str, str, int] | None:
        """(question, answer, end of the question in ``text``) of the first known question in it."""
        for question, answer in self.problems.items():
            at = text.find(question)
            if at >= 0:
                return question, answer, at + len(question)
        return None

    def p_right(self, question: str) -> float:
        """This model's chance of a right answer to ``question``."""
        if self._flat or self.skill is None:
            return self.accuracy
        return _logistic(self.skill - self.difficulties[question])

    def answer_probability(self, question: str, answer: str) -> float:
        """The chance that this model states ``answer`` to the bare ``question`` (no candidates
        shown): its belief in that answer, which ``confidence_from="belief"`` scores."""
        truth, p = self.problems[question], self.p_right(question)
        if answer == truth:
            return p
        q = (1 - p) * self.distractor * (answer == self.distractors[question])
        slips = self._slips(truth)
        return q + (1 - p) * (1 - self.distractor) * slips.count(answer) / len(slips)

    @staticmethod
    def _slips(truth: str) -> list[str]:
        try:
            return [str(int(truth) + o) for o in _NEARBY]
        except ValueError:
            return [truth + "?"]

    def answer(self, text: str, seed: int | None) -> str | None:
        found = self.find(text)
        if found is None:
            return None
        question, truth, end = found
        if _unit(self.seed, text, seed) < self.p_right(question):
            return truth
        group = [a.strip() for a in _BOXED.findall(text[end:]) if a.strip()]
        if group and (self.copy >= 1 or _unit(self.seed, text, seed, "adopt") < self.copy):
            return group[_hash(self.seed, text, seed, "copy") % len(group)]
        if self.distractor > 0 and _unit(self.seed, text, seed, "distractor") < self.distractor:
            return self.distractors[question]
        slips = self._slips(truth)
        return slips[_hash(self.seed, text, seed, "wrong") % len(slips)]

    def plan(self, request: SimRequest) -> Plan:
        text = request.prompt_text or ""
        key = _hash(self.seed, text, request.seed)
        words = self._p.words(self.reasoning_tokens, key)
        answer = self.answer(text, request.seed)
        closing = f" So the answer is \\boxed{{{answer}}}." if answer is not None else " I am not sure."
        tail = self._p.tokenizer.split(closing)
        return self._p.plan(words + tail, request, logprob=lambda i: -0.1)

    def prompt_confidence(self, text: str) -> float:
        correct, wrong, noise = self.confidence
        stated = [a.strip() for a in _BOXED.findall(text) if a.strip()]
        last = stated[-1] if stated else None
        if last is not None and last in self.by_answer:
            c = self.by_answer[last]
        else:
            found = self.find(text)
            if found is None or last is None:
                c = wrong
            elif self.confidence_from == "belief":
                c = wrong + (correct - wrong) * self.answer_probability(found[0], last)
            else:
                c = correct if last == found[1] else wrong
        return c + noise * ((_hash(self.seed, text, "noise") % 10_000) / 10_000 - 0.5)

    def prompt_logprobs(self, pieces: Sequence[str], top_k: int) -> list[list[tuple[str, float]]]:
        """Per prompt token after the first: its top-k (token, logprob), the token itself first."""
        row = _top_row(self.prompt_confidence("".join(pieces)), max(1, top_k))
        alternatives = self._p.words(len(row), self.seed)
        return [[(pieces[i], row[0])] + [(w, lp) for w, lp in zip(alternatives[1:], row[1:], strict=True)]
                for i in range(1, len(pieces))]


def hashed_prompt_logprobs(pieces: Sequence[str], top_k: int, seed: int = 0) -> list[list[tuple[str, float]]]:
    """Prompt logprobs for scripts that do not script them: deterministic values in (-2, 0]."""
    out = []
    for i in range(1, len(pieces)):
        lp = -(_hash(seed, i, pieces[i]) % 2000) / 1000
        out.append([(pieces[i], lp)] + [(w, lp - 0.5 * (j + 1)) for j, w in enumerate(_WORDS[: max(0, top_k - 1)])])
    return out


def problem_script(spec: dict[str, Any], seed: int = 0) -> ProblemScript:
    """A ``ProblemScript`` from its JSON form: ``{"kind": "problems", "accuracy": 0.7, "problems":
    [{"question": ..., "answer": ..., "difficulty"?: 1.2, "distractor"?: ...}],
    "confidence_correct": 2.0, ..., "difficulty_sd": 1.5, "distractor": 0.5, "copy": 0.5,
    "confidence_from": "belief"}`` (every key after ``problems`` optional)."""
    problems = spec["problems"]
    skill = spec.get("skill")
    return ProblemScript({p["question"]: str(p["answer"]) for p in problems}, float(spec["accuracy"]),
                         seed=int(spec.get("seed", seed)), reasoning_tokens=int(spec.get("reasoning_tokens", 12)),
                         confidence_correct=float(spec.get("confidence_correct", 2.0)),
                         confidence_wrong=float(spec.get("confidence_wrong", 1.0)),
                         confidence_noise=float(spec.get("confidence_noise", 0.0)),
                         by_answer={str(k): float(v) for k, v in (spec.get("by_answer") or {}).items()},
                         difficulty_sd=float(spec.get("difficulty_sd", 0.0)),
                         difficulty_seed=int(spec.get("difficulty_seed", 0)),
                         difficulties={p["question"]: float(p["difficulty"]) for p in problems
                                       if p.get("difficulty") is not None},
                         skill=None if skill is None else float(skill),
                         distractor=float(spec.get("distractor", 0.0)),
                         distractors={p["question"]: str(p["distractor"]) for p in problems
                                      if p.get("distractor") is not None},
                         copy=float(spec.get("copy", 1.0)),
                         confidence_from=spec.get("confidence_from", "truth"))

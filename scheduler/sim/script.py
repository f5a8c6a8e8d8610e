"""Scripted model behaviour: what the simulated model "says", decided when a request arrives.

The engine decides *when* tokens come out; a ``Script`` decides *which*. Every script is a pure
function of the request (and its own seed), so runs are reproducible. Pieces must tokenize back
to themselves under ``SimTokenizer`` (1-4 letters with an optional leading space), so that the
next turn's prompt, which contains this reply, shares its token prefix with the cached one.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal, Protocol, Sequence

from scheduler.backends.base import ToolCall
from scheduler.sim.tokenizer import SimTokenizer

if TYPE_CHECKING:
    from scheduler.sim.engine import SimRequest

_SYLLABLES = ("the", "of", "and", "to", "in", "is", "code", "fix", "test", "run", "file", "diff",
              "bug", "err", "ok", "step", "call", "tool", "read", "edit", "path", "line", "so", "now")


@dataclass(frozen=True)
class Plan:
    """The whole reply: one piece per output token, with optional logprobs and tool calls."""

    pieces: list[str]
    finish_reason: Literal["stop", "length", "tool_calls"]
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[str, float]]] = field(default_factory=list)


class Script(Protocol):
    def plan(self, request: "SimRequest") -> Plan: ...


def _hash(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


_WORDS = tuple(" " + w for w in _SYLLABLES)


def _words(n: int, key: int) -> list[str]:
    return random.Random(key).choices(_WORDS, k=n)


def _with_logprobs(pieces: list[str], key: int, request: "SimRequest") -> tuple[list[float], list[list[tuple[str, float]]]]:
    """Deterministic logprobs in (-2, 0] and ``top_logprobs`` alternatives, best first."""
    if not request.logprobs:
        return [], []
    lps = [-(_hash(key, "lp", i) % 2000) / 1000 for i in range(len(pieces))]
    tops = []
    for i, (piece, lp) in enumerate(zip(pieces, lps)):
        alts = [(piece, lp)] + [(w, lp - 0.5 * (j + 1)) for j, w in enumerate(_words(request.top_logprobs, _hash(key, i)))]
        tops.append(alts[: request.top_logprobs])
    return lps, tops


def _finish(pieces: list[str], request: "SimRequest") -> Plan:
    reason: Literal["stop", "length"] = "stop"
    if len(pieces) >= request.max_new_tokens:
        pieces, reason = pieces[: request.max_new_tokens], "length"
    return Plan(pieces=pieces, finish_reason=reason)


def _tool_call_plan(name: str, arguments: str, key: int, request: "SimRequest", tokenizer: SimTokenizer) -> Plan:
    text = json.dumps({"name": name, "arguments": json.loads(arguments)})
    pieces = tokenizer.split(text)[: request.max_new_tokens]
    call = ToolCall(id=f"call_{key % 16**12:012x}", name=name, arguments=arguments)
    return Plan(pieces=pieces, finish_reason="tool_calls", tool_calls=[call])


class PseudoScript:
    """Default: pseudo-words, a length drawn from the prompt and seed (all of ``max_new_tokens``
    when ``ignore_eos``), and a tool call when the request forces one (``tool_choice``
    ``required`` or a named function), with ``{}`` arguments."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._tokenizer = SimTokenizer()

    def plan(self, request: "SimRequest") -> Plan:
        key = _hash(self.seed, request.seed, tuple(request.input_ids[-64:]), len(request.input_ids))
        forced = _forced_tool(request)
        if forced is not None:
            return _tool_call_plan(forced, "{}", key, request, self._tokenizer)
        n = request.max_new_tokens if request.ignore_eos else max(1, request.max_new_tokens // 2 + key % (request.max_new_tokens // 2 + 1))
        plan = _finish(_words(n, key), request)
        lps, tops = _with_logprobs(plan.pieces, key, request)
        return Plan(plan.pieces, plan.finish_reason, logprobs=lps, top_logprobs=tops)


def _forced_tool(request: "SimRequest") -> str | None:
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
    """One agent turn of a trace: ``output_tokens`` of reasoning, then a tool call or the end."""

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
        self._tokenizer = SimTokenizer()

    def plan(self, request: "SimRequest") -> Plan:
        index = request.meta.get("turn")
        if index is None:
            index = sum(1 for m in request.messages or [] if m.get("role") == "assistant")
        turn = self.turns[min(int(index), len(self.turns) - 1)]
        key = _hash(self.seed, request.rid, index)
        if turn.tool is None:
            return _finish(_words(turn.output_tokens, key), request)
        plan = _tool_call_plan(turn.tool, turn.arguments, key, request, self._tokenizer)
        thinking = _words(max(0, min(turn.output_tokens, request.max_new_tokens) - len(plan.pieces)), key)
        return Plan(thinking + plan.pieces, "tool_calls", plan.tool_calls)


class TextScript:
    """A given reply (fixed, or computed from the request) with a fixed per-token logprob:
    evolve tests use it to control answers and confidence."""

    def __init__(self, reply: str | Callable[["SimRequest"], str], logprob: float = -0.1) -> None:
        self.reply = reply
        self.logprob = logprob
        self._tokenizer = SimTokenizer()

    def plan(self, request: "SimRequest") -> Plan:
        text = self.reply(request) if callable(self.reply) else self.reply
        plan = _finish(self._tokenizer.split(text), request)
        if not request.logprobs:
            return plan
        tops = [[(p, self.logprob)][: request.top_logprobs] for p in plan.pieces]
        return Plan(plan.pieces, plan.finish_reason, logprobs=[self.logprob] * len(plan.pieces), top_logprobs=tops)


class ChunkedScript:
    """Text in numbered chunks of exactly ``chunk_tokens`` tokens (``"[k]"`` opens chunk k, 3
    tokens), for staircase-pipeline tests that cut a stream at chunk boundaries."""

    def __init__(self, chunk_tokens: int, chunks: int, seed: int = 0) -> None:
        if chunk_tokens < 4:
            raise ValueError("chunk_tokens must be >= 4")
        self.chunk_tokens = chunk_tokens
        self.chunks = chunks
        self.seed = seed

    def plan(self, request: "SimRequest") -> Plan:
        key = _hash(self.seed, request.rid)
        pieces: list[str] = []
        for k in range(self.chunks):
            pieces += [" [", str(k % 10), "]"] + _words(self.chunk_tokens - 3, _hash(key, k))
        return _finish(pieces, request)

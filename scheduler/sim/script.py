"""Scripted model behaviour: what the simulated model "says", decided when a request arrives.

The engine decides *when* tokens come out; a ``Script`` decides *which*. Every script is a pure
function of the request (and its own seed), so runs are reproducible. Pieces tokenize back to
themselves under ``SimTokenizer`` (1-4 letters with an optional leading space), so the next
turn's prompt, which contains this reply, shares its token prefix with the cached one.
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
    def plan(self, request: "SimRequest") -> Plan: ...


def _hash(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


class _Pieces:
    """Turns pieces into a ``Plan``: ids from one tokenizer, truncation at ``max_new_tokens``."""

    def __init__(self) -> None:
        self.tokenizer = SimTokenizer()

    def words(self, n: int, key: int) -> list[str]:
        return random.Random(key).choices(_WORDS, k=n)

    def plan(self, pieces: list[str], request: "SimRequest", reason: Literal["stop", "tool_calls"] = "stop",
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
                for i, (p, lp) in enumerate(zip(pieces, lps))]
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

    def plan(self, request: "SimRequest") -> Plan:
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

    def plan(self, request: "SimRequest") -> Plan:
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

    def __init__(self, reply: str | Callable[["SimRequest"], str], logprob: float = -0.1) -> None:
        self.reply = reply
        self.logprob = logprob
        self._p = _Pieces()

    def plan(self, request: "SimRequest") -> Plan:
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

    def plan(self, request: "SimRequest") -> Plan:
        key = _hash(self.seed, request.rid)
        pieces: list[str] = []
        for k in range(self.chunks):
            pieces += [" [", str(k % 10), "]"] + self._p.words(self.chunk_tokens - 3, _hash(key, k))
        return self._p.plan(pieces, request)

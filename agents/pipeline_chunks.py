"""Staircase bookkeeping, free of I/O: cutting streamed outputs into chunks, and deciding when an
aggregating agent has a round to run and what goes into it.

Chunk sizes are in tokens, counted on the text itself (a piece is a short word, a symbol or a
space: about one token of a BPE tokenizer, exactly one of the simulator's), so they do not depend
on how a backend groups its stream deltas. A chunk boundary is placed only once the piece after
it has started, so a word split across two deltas is never split across two chunks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from collections.abc import Callable

# the simulator tokenizer's pieces (scheduler/sim/tokenizer.py), which cover any text losslessly
_PIECE = re.compile(r"<\|[a-z_]+\|>| ?[A-Za-z0-9]{1,4}| ?[^\sA-Za-z0-9]|\s")


def count_tokens(text: str) -> int:
    """About how many tokens ``text`` is (exact for the simulator)."""
    return len(_PIECE.findall(text))


class ChunkCutter:
    """One agent's output, cut into chunks of ``size(k)`` tokens as its text streams in."""

    def __init__(self, size: Callable[[int], int]) -> None:
        self.size = size
        self.text = ""
        self.chunks: list[str] = []
        self._boundary = 0  # character offset where the next chunk starts
        self.finished = False

    def feed(self, delta: str) -> list[str]:
        """Add streamed text; returns the chunks it completed."""
        if self.finished:
            raise ValueError("feed after finish")
        self.text += delta
        done: list[str] = []
        while True:
            need = self.size(len(self.chunks))
            pieces = _PIECE.findall(self.text, self._boundary)
            if len(pieces) <= need:  # the last piece may still grow: wait for the next one to start
                return done
            end = self._boundary + sum(len(p) for p in pieces[:need])
            done.append(self.text[self._boundary:end])
            self.chunks.append(done[-1])
            self._boundary = end

    def finish(self) -> str | None:
        """The output ended (or was cut off): the rest is the last chunk, if there is a rest."""
        self.finished = True
        rest = self.text[self._boundary:]
        self._boundary = len(self.text)
        if not rest:
            return None
        self.chunks.append(rest)
        return rest


@dataclass
class Upstream:
    """What an aggregating agent sees of one input: the chunks so far, and whether it has ended."""

    chunks: list[str] = field(default_factory=list)
    ended: bool = False


@dataclass(frozen=True)
class RoundPlan:
    parts: list[str]  # the new text of each input
    complete: list[bool]  # whether each input had ended when the round was planned
    taken: list[int]  # chunks of each input consumed after this round
    final: bool  # every input has ended and is consumed: the agent may write to its end


class RoundPlanner:
    """When an aggregating agent may run its next round, and with what.

    A round is ready once every input that has not ended has a chunk the agent has not seen
    (an ended input counts as arrived): that is "chunk j of every proposer has arrived". The round
    then takes every chunk that has arrived, so an agent that fell behind catches up in one
    round instead of one round per chunk. ``taken`` starts where a resumed run left off."""

    def __init__(self, inputs: int, taken: list[int] | None = None) -> None:
        self.taken = list(taken) if taken is not None else [0] * inputs
        if len(self.taken) != inputs:
            raise ValueError("taken needs one entry per input")
        self.rounds = 0
        self.final_done = False  # a final round ran: nothing is left to plan

    def plan(self, ups: list[Upstream]) -> RoundPlan | None:
        if len(ups) != len(self.taken):
            raise ValueError("one upstream per input")
        if not all(u.ended or len(u.chunks) > t for u, t in zip(ups, self.taken, strict=False)):
            return None
        all_ended = all(u.ended for u in ups)
        fresh = any(len(u.chunks) > t for u, t in zip(ups, self.taken, strict=False))
        if self.final_done or (not fresh and not all_ended):
            return None
        parts = ["".join(u.chunks[t:]) for u, t in zip(ups, self.taken, strict=False)]
        return RoundPlan(parts, [u.ended for u in ups], [len(u.chunks) for u in ups], all_ended)

    def commit(self, plan: RoundPlan) -> None:
        self.taken = list(plan.taken)
        self.rounds += 1
        self.final_done = plan.final

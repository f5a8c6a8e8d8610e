"""The prompts of a pipeline: proposers answer the task; aggregating agents synthesize.

An aggregating agent (a proposer of layer 2+, or the final aggregator) gets the previous layer's
outputs in its system prompt, as in Mixture-of-Agents. In staircase mode those outputs arrive in
parts, so its conversation grows by appending, never by editing: round 0 is the system prompt
(instruction + the first parts) and the task; each later round adds the agent's own previous
output as an assistant turn and the next parts as a user turn. Every request is therefore the
previous request plus the previous answer plus new text: the engine's prefix cache serves all
of it but the new text. With one round (every output complete), the messages are exactly the
classic ``wait``-mode prompt, which is what makes the two modes agree when chunks are large.

With ``prefix`` continuation, each later round instead appends only the new parts (as a user
turn) and ends with the agent's whole answer so far as an open assistant turn, which the engine
continues (``continue_final_message``): the model goes on with its own text instead of being
asked, in a new turn, to continue it, which small models answer by starting over. The cache then
serves everything up to the previous round's new parts; the answer so far is sent again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

AGGREGATE_PROMPT = (
    "Several assistants have answered the user's request below; their responses follow. Write one answer of "
    "your own that is better than each of them: weigh the responses critically, since any of them may be "
    "wrong, biased or incomplete, keep what is correct and useful, fix or drop what is not, and do not merely "
    "copy or list them. Answer the user directly, clearly and accurately."
)
PARTIAL_MARK = " [...]"
CONTINUE = "Continue your answer exactly where you stopped; do not repeat or restart it."


def proposer_messages(task: str, system_prompt: str | None) -> list[dict[str, Any]]:
    """A first-layer proposer: its own system prompt (if any) and the task."""
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return head + [{"role": "user", "content": task}]


def _listing(parts: list[str], complete: list[bool]) -> str:
    return "\n\n".join(f"Response {i + 1}:\n{text or ('(no response)' if done else '')}{'' if done else PARTIAL_MARK}"
                       for i, (text, done) in enumerate(zip(parts, complete, strict=False)))


def _more(parts: list[str], complete: list[bool], newly_complete: list[bool], ask: bool = True) -> str:
    lines = [f"Response {i + 1}, continued:\n{text}{'' if done else PARTIAL_MARK}"
             for i, (text, done) in enumerate(zip(parts, complete, strict=False)) if text]
    ended = [str(i + 1) for i, (text, now) in enumerate(zip(parts, newly_complete, strict=False)) if now and not text]
    if ended:
        lines.append(f"Response{'s' if len(ended) > 1 else ''} {', '.join(ended)} ended there.")
    if not lines:
        lines.append("The responses are complete.")
    return "More of the responses arrived.\n\n" + "\n\n".join(lines) + ("\n\n" + CONTINUE if ask else "")


class RestartGuard:
    """Drops a round's output where it starts the answer over instead of continuing it.

    A chat model asked to continue after its own finished turn often begins a new answer instead
    (SmolLM2-135M at temperature 0 does so in most rounds: "The capital of FranceThe capital of
    France is Paris."). The user has read the answer so far, so a round may not write it again.
    ``starts`` are the places a restart can begin: the start of the answer, and the start of
    each earlier round's output (a model may also repeat only its last round). The guard holds the
    round's text back while it is still a prefix of one of them; once it covers one entirely, that
    part is dropped and the rest goes on; once it is a prefix of none, everything held is released
    unchanged. A round that ends while still a prefix of the answer wrote nothing new. What is
    held is released as soon as it diverges, so a genuine continuation is delayed by a few tokens
    at most. A restart that rewords the answer is not caught (it is not a repetition)."""

    def __init__(self, rounds: list[str]) -> None:
        text = "".join(rounds)
        starts = [sum(len(r) for r in rounds[:i]) for i in range(len(rounds))]
        self.candidates = [c for c in dict.fromkeys(text[i:].lstrip() for i in starts) if c.strip()]
        self.held = ""
        self.passing = not self.candidates
        self.kept: list[str] = []  # the text this round keeps (what the user reads)
        self.dropped = 0  # characters dropped as a restart

    def feed(self, delta: str) -> str:
        """Stream text in; returns what may be shown now."""
        if self.passing:
            self.kept.append(delta)
            return delta
        self.held += delta
        body = self.held.lstrip()
        if not body:
            return ""
        covered = [c for c in self.candidates if body.startswith(c)]
        if covered:
            restart = max(covered, key=len)
            cut = len(self.held) - len(body) + len(restart)
            return self._release(self.held[cut:], cut)
        if any(c.startswith(body) for c in self.candidates):
            return ""
        return self._release(self.held, 0)

    def finish(self) -> str:
        """The round ended: text still held repeated the answer so far, and is dropped; text that
        was only whitespace is kept."""
        if self.passing:
            return ""
        if self.held.strip():
            return self._release("", len(self.held))
        return self._release(self.held, 0)

    def _release(self, text: str, dropped: int) -> str:
        self.passing = True
        self.dropped += dropped
        self.held = ""
        self.kept.append(text)
        return text

    @property
    def text(self) -> str:
        return "".join(self.kept)


@dataclass
class Round:
    """One round of an aggregating agent: what it was given, and what it wrote."""

    parts: list[str]  # the new text of each upstream output ("" when none)
    complete: list[bool]  # whether each upstream output had ended by this round
    output: str = ""


@dataclass
class Conversation:
    """An aggregating agent's growing conversation (see the module docstring)."""

    task: str
    instruction: str
    upstreams: int
    rounds: list[Round] = field(default_factory=list)
    prefix: bool = False  # continuation "prefix": the answer so far is an open assistant turn, last

    def add_round(self, parts: list[str], complete: list[bool]) -> Round:
        if len(parts) != self.upstreams or len(complete) != self.upstreams:
            raise ValueError(f"a round needs one part per upstream ({self.upstreams})")
        r = Round(list(parts), list(complete))
        self.rounds.append(r)
        return r

    def messages(self) -> list[dict[str, Any]]:
        """The request for the last round added."""
        if not self.rounds:
            raise ValueError("no round yet")
        first = self.rounds[0]
        msgs: list[dict[str, Any]] = [
            {"role": "system", "content": f"{self.instruction}\n\n{_listing(first.parts, first.complete)}"},
            {"role": "user", "content": self.task}]
        before = first.complete
        for prev, r in zip(self.rounds, self.rounds[1:], strict=False):
            if not self.prefix:
                msgs.append({"role": "assistant", "content": prev.output})
            newly = [now and not was for now, was in zip(r.complete, before, strict=False)]
            msgs.append({"role": "user", "content": _more(r.parts, r.complete, newly, ask=not self.prefix)})
            before = r.complete
        if self.continues:
            msgs.append({"role": "assistant", "content": "".join(r.output for r in self.rounds[:-1])})
        return msgs

    @property
    def continues(self) -> bool:
        """Whether the request for the last round ends with the agent's own answer so far, as an
        open assistant turn to continue (``prefix``; the request must then ask the engine to
        continue the final message instead of opening a new turn)."""
        return self.prefix and bool("".join(r.output for r in self.rounds[:-1]))

    @property
    def text(self) -> str:
        """What the agent has written so far: its rounds' outputs, appended."""
        return "".join(r.output for r in self.rounds)

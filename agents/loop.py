"""The agent loop: LLM turn, tool calls, results back, until an answer or a budget runs out.

Each LLM turn and each tool call is a checkpointed step of the run, so a run replayed after a
crash rebuilds its conversation from the checkpoints and goes on from the first step that had
not finished; each is also an event on the run's stream. Nothing the model emits can crash
the loop: bad calls come back to it as tool errors (see ``tools.registry``).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol
from collections.abc import Awaitable, Callable

from agents.spec import AgentInput
from agents.text_tools import parse_text_calls, tools_prompt
from scheduler.backends.base import GenerateRequest, Generation
from tools.registry import ToolContext, ToolRegistry, ToolResult


LLMCall = Callable[[GenerateRequest], Awaitable[Generation]]
# The prompt token ids a backend will feed its model for a request (``LocalEngine.encode``)
PromptEncoder = Callable[[GenerateRequest], list[int]]
REMINDER = "Continue the task with a tool call, or call final_answer with your answer."
REPEATED = ("You made the same call again and got the same result; it tells you nothing new. "
            "Use what you have: do something else, or call final_answer with your answer.")
PREVIEW_CHARS = 2000  # of tool output and text in events; the checkpoint keeps the whole


class StepContext(Protocol):
    """The part of ``RunContext`` the loop uses."""

    async def step(self, name: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any: ...
    async def emit(self, type_: str, data: dict[str, Any]) -> None: ...


@dataclass
class ToolHooks:
    """Told when a tool starts and ends: the scheduler's acting phase."""

    started: Callable[[str], None] = lambda _name: None
    ended: Callable[[], None] = lambda: None


@dataclass
class Totals:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    by_tool: dict[str, int] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class AgentLoop:
    def __init__(self, spec: AgentInput, ctx: StepContext, llm: LLMCall, tools: ToolRegistry,
                 tool_ctx: ToolContext, hooks: ToolHooks | None = None, *,
                 clock: Callable[[], float] = time.monotonic, record_tokens: bool = False,
                 encode: PromptEncoder | None = None) -> None:
        """``record_tokens``: each turn asks for logprobs and its checkpoint keeps a ``tokens``
        record (see ``token_record``) for RL training; ``encode`` gives the turn's prompt token
        ids where the backend cannot return them (``None``: they are not recorded)."""
        self.spec = spec
        self.ctx = ctx
        self.llm = llm
        self.tools = tools
        self.tool_ctx = tool_ctx
        self.hooks = hooks or ToolHooks()
        self.clock = clock
        self.record_tokens = record_tokens
        self.encode = encode
        self.totals = Totals()
        native = spec.tool_mode != "text"
        system = spec.system_prompt
        if not native:
            system = f"{system}\n\n{tools_prompt(tools.specs())}"
        self.native = native
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system},
                                               {"role": "user", "content": spec.task}]
        self._results: dict[tuple[str, str], str] = {}  # (tool, arguments) -> the content it returned
        self._avoid: str | None = None  # the tool the next turn may not call (a repeat with nothing new)

    async def run(self) -> dict[str, Any]:
        started = self.clock()
        answer: str | None = None
        reason = "max_turns"
        turns = 0
        try:
            async with asyncio.timeout(self.spec.time_budget_s):
                answer, reason, turns = await self._turns(started)
        except TimeoutError:
            reason = "time_budget"
            turns = self._turns_done
        result = {"answer": answer, "stop_reason": reason, "turns": turns,
                  "tool_calls": self.totals.tool_calls, "tool_errors": self.totals.tool_errors,
                  "tools_used": dict(self.totals.by_tool),
                  "usage": {"prompt_tokens": self.totals.prompt_tokens,
                            "completion_tokens": self.totals.completion_tokens,
                            "cached_tokens": self.totals.cached_tokens},
                  "elapsed_s": round(self.clock() - started, 3)}
        await self.ctx.emit("agent.finished", {k: result[k] for k in ("stop_reason", "turns", "tool_calls", "usage")}
                            | {"answer": _preview(answer)})
        return result

    _turns_done = 0

    async def _turns(self, started: float) -> tuple[str | None, str, int]:
        spec = self.spec
        for turn in range(spec.max_turns):
            self._turns_done = turn
            if spec.max_total_tokens is not None and self.totals.tokens >= spec.max_total_tokens:
                return None, "token_budget", turn
            request = GenerateRequest(
                messages=[dict(m) for m in self.messages],
                tools=self.tools.specs() if self.native and len(self.tools.names()) else None,
                tool_choice=self._tool_choice() if self.native and self.tools.names() else None,
                max_tokens=spec.max_tokens_per_turn, temperature=spec.temperature, seed=spec.seed,
                model=spec.model, logprobs=self.record_tokens)
            out = await self.ctx.step(f"turn-{turn}", self._llm_turn, request)
            self._count(out["usage"])
            calls = self._calls(out, turn)
            self.messages.append(self._assistant_message(out["text"], calls))
            self._turns_done = turn + 1
            await self.ctx.emit("agent.turn", {
                "turn": turn, "text": _preview(out["text"]), "finish_reason": out["finish_reason"],
                "tool_calls": [{"name": c["name"], "arguments": _preview(c["arguments"])} for c in calls],
                "usage": out["usage"], "tokens_so_far": self.totals.tokens})
            if any(s in out["text"] for s in spec.stop_strings):
                return out["text"], "stop_string", turn + 1
            if not calls:
                if spec.stop_on_text_reply:
                    return out["text"], "text_reply", turn + 1
                self.messages.append({"role": "user", "content": REMINDER})
                continue
            self._avoid = None
            for j, call in enumerate(calls):
                result = ToolResult.from_json(
                    await self.ctx.step(f"tool-{turn}-{j}", self._tool, call["name"], call["arguments"]))
                self._count_tool(call["name"], result)
                self.messages.append(self._tool_message(call, result))
                if self._repeats(call, result):
                    self._avoid = call["name"]
                await self.ctx.emit("agent.tool", {
                    "turn": turn, "call": j, "tool": call["name"], "arguments": _preview(call["arguments"]),
                    "ok": result.ok, "error": result.error, "content": _preview(result.content),
                    "duration_s": round(result.duration_s, 3)})
                if result.final:
                    return result.content, "final_answer", turn + 1
            if self._avoid is not None:
                if self._tool_choice() == self.spec.tool_choice:  # not steered by the choice: say it
                    self.messages.append({"role": "user", "content": REPEATED})
                await self.ctx.emit("agent.repeat", {"turn": turn, "tool": self._avoid,
                                                     "next_tool_choice": self._tool_choice()})
        return None, "max_turns", spec.max_turns

    # ---- repeats -----------------------------------------------------------------------------

    def _repeats(self, call: dict[str, str], result: ToolResult) -> bool:
        """A call that repeats an earlier one exactly and got exactly the same result taught the
        model nothing; small models loop on such calls until ``max_turns``. The same command
        after an edit is not a repeat: its result differs. Derived only from the checkpointed
        calls and results, so a replayed run steers the same way."""
        key = (call["name"], call["arguments"])
        repeated = self._results.get(key) == result.content and not result.final
        self._results[key] = result.content
        return repeated

    def _tool_choice(self) -> Any:
        """The spec's ``tool_choice``; after a repeat, required calls go to another tool: named
        when only one is left (the grammar of a constrained backend then allows only it)."""
        if self._avoid is None or self.spec.tool_choice != "required":
            return self.spec.tool_choice
        others = [n for n in self.tools.names() if n != self._avoid]
        return {"type": "function", "function": {"name": others[0]}} if len(others) == 1 else "required"

    # ---- steps -------------------------------------------------------------------------------

    async def _llm_turn(self, request: GenerateRequest) -> dict[str, Any]:
        gen = await self.llm(request)  # retried, where a retry is safe, by the program session
        out: dict[str, Any] = {
            "text": gen.text, "finish_reason": gen.finish_reason,
            "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in gen.tool_calls],
            "usage": {"prompt_tokens": gen.usage.prompt_tokens, "completion_tokens": gen.usage.completion_tokens,
                      "cached_tokens": gen.usage.cached_tokens}}
        if self.record_tokens:
            out["tokens"] = token_record(gen, self.encode(request) if self.encode is not None else None)
        return out

    async def _tool(self, name: str, arguments: str) -> dict[str, Any]:
        self.hooks.started(name)
        try:
            result = await self.tools.call(name, arguments, self.tool_ctx)
        finally:
            self.hooks.ended()
        return result.to_json()

    # ---- messages ----------------------------------------------------------------------------

    def _calls(self, out: dict[str, Any], turn: int) -> list[dict[str, Any]]:
        if out["tool_calls"] and self.native:
            return out["tool_calls"]
        if self.spec.tool_mode == "native":
            return []
        return [{"id": f"call_{turn}_{j}", "name": c.name, "arguments": c.arguments, "text": True}
                for j, c in enumerate(parse_text_calls(out["text"]))]

    def _assistant_message(self, text: str, calls: list[dict[str, str]]) -> dict[str, Any]:
        native_calls = [c for c in calls if not c.get("text")]
        if not native_calls:
            return {"role": "assistant", "content": text}
        return {"role": "assistant", "content": text or None,
                "tool_calls": [{"id": c["id"], "type": "function",
                                "function": {"name": c["name"], "arguments": c["arguments"]}} for c in native_calls]}

    def _tool_message(self, call: dict[str, str], result: ToolResult) -> dict[str, Any]:
        if call.get("text"):
            return {"role": "user", "content": f"Result of {call['name']}:\n{result.content}"}
        return {"role": "tool", "tool_call_id": call["id"], "content": result.content}

    def _count(self, usage: dict[str, int]) -> None:
        self.totals.prompt_tokens += usage["prompt_tokens"]
        self.totals.completion_tokens += usage["completion_tokens"]
        self.totals.cached_tokens += usage["cached_tokens"]

    def _count_tool(self, name: str, result: ToolResult) -> None:
        self.totals.tool_calls += 1
        self.totals.tool_errors += 0 if result.ok else 1
        self.totals.by_tool[name] = self.totals.by_tool.get(name, 0) + 1


def token_record(gen: Generation, prompt_ids: list[int] | None) -> dict[str, Any]:
    """A turn's tokens for training: its prompt's ids (``None`` when unknown), its completion's
    ids, and per completion token its logprob and mask. A backend returns one logprob per
    sampled token; tokens a grammar forced after a sampled one (the local engine's tool calls)
    have none: they were not sampled, so their mask is 0 and their logprob ``None``. Logprobs
    are matched to tokens by their ``token_id`` when the counts differ; without ids to match
    (or without logprobs) every token counts as sampled, its logprob ``None`` where unknown."""
    ids = list(gen.token_ids)
    lps = gen.logprobs
    logprobs: list[float | None]
    if len(lps) == len(ids):
        logprobs, mask = [lp.logprob for lp in lps], [1] * len(ids)
    elif lps and all(lp.token_id is not None for lp in lps):
        logprobs, mask, j = [], [], 0
        for token in ids:
            if j < len(lps) and lps[j].token_id == token:
                logprobs.append(lps[j].logprob)
                mask.append(1)
                j += 1
            else:
                logprobs.append(None)
                mask.append(0)
    else:
        logprobs, mask = [None] * len(ids), [1] * len(ids)
    return {"prompt_ids": prompt_ids, "completion_ids": ids, "completion_logprobs": logprobs,
            "completion_mask": mask}


def _preview(text: str | None) -> str | None:
    if text is None or len(text) <= PREVIEW_CHARS:
        return text
    return text[:PREVIEW_CHARS] + f"... [{len(text) - PREVIEW_CHARS} more characters]"


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)

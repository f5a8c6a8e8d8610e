"""The agent loop's repeat guard, as a unit: a scripted model, a registry of pure tools and a
step context that runs steps in memory (the loop's logic, not the service; the service paths are
in test_agent_sim.py and test_agent_local.py)."""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from agents.loop import REPEATED, AgentLoop
from agents.spec import AgentInput
from scheduler.backends.base import GenerateRequest, Generation, ToolCall, Usage
from tools.builtins import final_answer
from tools.registry import ToolContext, ToolRegistry, ToolResult


class Steps:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    async def step(self, name: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return await fn(*args)

    async def emit(self, type_: str, data: dict[str, Any]) -> None:
        self.events.append((type_, data))


def registry(counter: dict[str, int]) -> ToolRegistry:
    reg = ToolRegistry()

    @reg.tool()
    async def look(ctx: ToolContext, what: str) -> str:
        """Look at something."""
        return f"{what} looks the same as ever"

    @reg.tool()
    async def tick(ctx: ToolContext) -> str:
        """A counter: each call returns a new value."""
        counter["n"] = counter.get("n", 0) + 1
        return f"tick {counter['n']}"

    reg.tool()(final_answer)
    return reg


def scripted(calls: list[tuple[str, dict[str, Any]]], seen: list[GenerateRequest]):
    """A model that makes the scripted calls in order, except that a named tool_choice is obeyed
    (as a grammar-constrained backend obeys it)."""
    script = iter(calls)

    async def llm(request: GenerateRequest) -> Generation:
        seen.append(request)
        if isinstance(request.tool_choice, dict):
            name, args = request.tool_choice["function"]["name"], {"answer": "obeyed"}
        else:
            name, args = next(script)
        return Generation(rid=request.rid, text="", finish_reason="tool_calls", usage=Usage(),
                          tool_calls=[ToolCall(id=f"c{len(seen)}", name=name, arguments=json.dumps(args))])

    return llm


async def run(tools: list[str], calls: list[tuple[str, dict[str, Any]]], tool_choice: str = "required"):
    seen: list[GenerateRequest] = []
    reg = registry({}).subset(tools)
    ctx = Steps()
    loop = AgentLoop(AgentInput(task="t", tool_choice=tool_choice, max_turns=6), ctx, scripted(calls, seen), reg,
                     ToolContext(sandbox=None))  # type: ignore[arg-type]  # these tools use no sandbox
    return await loop.run(), seen, ctx.events


async def test_a_repeat_with_the_same_result_steers_the_next_turn_to_the_other_tool():
    out, seen, events = await run(["look", "final_answer"], [("look", {"what": "x"})] * 6)
    assert out["stop_reason"] == "final_answer" and out["answer"] == "obeyed" and out["turns"] == 3
    assert [r.tool_choice for r in seen] == ["required", "required",
                                             {"type": "function", "function": {"name": "final_answer"}}]
    assert [e for t, e in events if t == "agent.repeat"] == [
        {"turn": 1, "tool": "look", "next_tool_choice": {"type": "function", "function": {"name": "final_answer"}}}]


async def test_a_repeated_call_with_a_new_result_is_not_a_repeat():
    out, seen, events = await run(["tick", "final_answer"], [("tick", {})] * 6)
    assert out["stop_reason"] == "max_turns" and all(r.tool_choice == "required" for r in seen)
    assert not [e for t, e in events if t == "agent.repeat"]


async def test_with_several_tools_left_the_model_is_told_and_the_choice_stays():
    out, seen, events = await run(["look", "tick", "final_answer"], [("look", {"what": "x"})] * 2 + [("tick", {})] * 4)
    assert all(r.tool_choice == "required" for r in seen)
    assert seen[2].messages[-1] == {"role": "user", "content": REPEATED}
    assert [e["turn"] for t, e in events if t == "agent.repeat"] == [1]

"""The tool registry: schemas from signatures or declared, and every way a model's call can be
wrong coming back as a tool error rather than an exception."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest
from pydantic import Field

from tools.registry import MAX_CONTENT_CHARS, ToolContext, ToolError, ToolRegistry, ToolResult

CTX = ToolContext(sandbox=None, program_id="p1", tenant="t")  # type: ignore[arg-type]  # these tools use none


def make_registry() -> ToolRegistry:
    reg = ToolRegistry()

    @reg.tool()
    async def add(ctx: ToolContext, a: int, b: Annotated[int, Field(description="second", ge=0)] = 1) -> str:
        """Add two integers.

        Longer text that is not part of the description."""
        return str(a + b)

    @reg.tool(name="mode")
    async def pick(ctx: ToolContext, kind: Literal["fast", "slow"]) -> str:
        """Pick a mode."""
        if kind == "slow":
            raise ToolError("slow mode is not available")
        return kind

    @reg.tool()
    async def boom(ctx: ToolContext) -> str:
        """Always fails with a bug."""
        raise ZeroDivisionError("division by zero")

    @reg.tool()
    async def big(ctx: ToolContext, n: int) -> str:
        """Return n characters."""
        return "x" * n

    async def echo(ctx: ToolContext, **kwargs: object) -> ToolResult:
        return ToolResult(repr(sorted(kwargs.items())))

    reg.declare("echo", "Echo the arguments.", {"type": "object", "properties": {"v": {"type": "array"}},
                                                 "required": ["v"]}, echo)
    return reg


def test_schema_from_signature_and_docstring():
    spec = make_registry().get("add").spec()
    assert spec == {"type": "function", "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["a"], "properties": {
            "a": {"type": "integer"}, "b": {"type": "integer", "default": 1, "description": "second", "minimum": 0}}}}}


async def test_valid_calls_run():
    reg = make_registry()
    assert (await reg.call("add", '{"a": 2, "b": 3}', CTX)).content == "5"
    assert (await reg.call("add", {"a": 2}, CTX)).content == "3"
    assert (await reg.call("echo", '{"v": [1, 2]}', CTX)).content == "[('v', [1, 2])]"


@pytest.mark.parametrize("name,args,error,says", [
    ("nope", "{}", "unknown_tool", "unknown tool 'nope'. Available tools: add, mode, boom, big, echo"),
    ("add", '{"a": 2,', "malformed_arguments", "not valid JSON"),
    ("add", "[1, 2]", "malformed_arguments", "must be a JSON object, got list"),
    ("add", '{"b": 1}', "invalid_arguments", "'a' is a required property"),
    ("add", '{"a": "two"}', "invalid_arguments", "a: 'two' is not of type 'integer'"),
    ("add", '{"a": 1, "b": -1}', "invalid_arguments", "b: -1 is less than the minimum of 0"),
    ("add", '{"a": 1, "c": 1}', "invalid_arguments", "Additional properties are not allowed ('c' was unexpected)"),
    ("mode", '{"kind": "medium"}', "invalid_arguments", "'medium' is not one of ['fast', 'slow']"),
    ("mode", '{"kind": "slow"}', "tool_error", "Error: slow mode is not available"),
    ("boom", "{}", "internal_error", "boom failed internally: ZeroDivisionError: division by zero"),
])
async def test_every_bad_call_is_a_tool_error(name: str, args: str, error: str, says: str):
    result = await make_registry().call(name, args, CTX)
    assert not result.ok and result.error == error and not result.final
    assert says in result.content


async def test_empty_arguments_mean_an_empty_object():
    assert (await make_registry().call("boom", "", CTX)).error == "internal_error"


async def test_huge_results_are_cut_in_the_middle():
    result = await make_registry().call("big", '{"n": 100000}', CTX)
    assert len(result.content) < MAX_CONTENT_CHARS + 100 and "characters cut" in result.content


def test_duplicate_names_and_bad_schemas_are_refused():
    reg = make_registry()
    with pytest.raises(ValueError):
        reg.declare("add", "again", {"type": "object"}, reg.get("add").fn)
    with pytest.raises(Exception):
        reg.declare("bad", "bad schema", {"type": "objekt"}, reg.get("add").fn)


def test_subset_keeps_order_and_rejects_unknown_names():
    reg = make_registry()
    assert reg.subset(["echo", "add"]).names() == ["echo", "add"]
    with pytest.raises(KeyError):
        reg.subset(["add", "nope"])


def test_results_survive_a_checkpoint_round_trip():
    r = ToolResult("c", ok=False, error="tool_error", data={"exit_code": 1}, duration_s=0.25)
    assert ToolResult.from_json(r.to_json()) == r

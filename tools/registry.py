"""Tools by name, each described by a JSON schema the model sees and the call is checked against.

The registry is the boundary between what a model writes and what runs. Whatever the model
emits (malformed JSON, an unknown tool, arguments that break the schema, a tool that raises)
comes back as a ``ToolResult`` with ``ok=False`` and a message the model can act on: an agent
run never crashes on a bad tool call.
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, get_type_hints

import jsonschema
from pydantic import TypeAdapter, create_model

from tools.sandbox.base import Sandbox, SandboxError

__all__ = ["Tool", "ToolContext", "ToolError", "ToolRegistry", "ToolResult"]

MAX_CONTENT_CHARS = 16_000  # what one tool result may put back into the conversation


class ToolError(Exception):
    """A tool refused or failed in a way the model should hear about (bad path, no match...)."""


@dataclass
class ToolContext:
    """What a tool call may use: the program's sandbox, and who it runs for."""

    sandbox: Sandbox
    program_id: str = ""
    tenant: str = ""


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one call. ``content`` goes back to the model as the tool message."""

    content: str
    ok: bool = True
    error: str | None = None   # unknown_tool | malformed_arguments | invalid_arguments | tool_error | internal_error
    final: bool = False        # the agent's answer: the loop stops
    data: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"content": self.content, "ok": self.ok, "error": self.error, "final": self.final,
                "data": self.data, "duration_s": round(self.duration_s, 4)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ToolResult:
        return cls(d["content"], d["ok"], d.get("error"), d.get("final", False), d.get("data") or {},
                   d.get("duration_s", 0.0))


ToolFn = Callable[..., Awaitable["str | ToolResult"]]


@dataclass(frozen=True)
class Tool:
    """A named tool: ``fn(ctx, **arguments)`` run after ``arguments`` passed ``parameters``."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: ToolFn

    def spec(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry (what SGLang's tool-call parsers read too)."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


def schema_from_callable(fn: Callable[..., Any]) -> dict[str, Any]:
    """A JSON schema for ``fn``'s keyword parameters after the first (the context), from its
    type hints and defaults, via pydantic; descriptions come from ``Annotated[..., Field(...)]``."""
    sig = inspect.signature(fn)
    hints = get_type_hints(fn, include_extras=True)
    params = list(sig.parameters.values())[1:]
    fields: dict[str, Any] = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"tool {fn.__name__}: *args / **kwargs cannot be described by a schema")
        annotation = hints.get(p.name, Any)
        fields[p.name] = (annotation, ... if p.default is inspect.Parameter.empty else p.default)
    model = create_model(f"{fn.__name__}_args", **fields)
    schema = TypeAdapter(model).json_schema()
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    schema["additionalProperties"] = False
    return schema


class ToolRegistry:
    """Tools by name. ``call`` never raises for anything the model did wrong."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, tool: Tool) -> Tool:
        if tool.name in self._tools:
            raise ValueError(f"tool {tool.name!r} is already registered")
        jsonschema.Draft202012Validator.check_schema(tool.parameters)
        self._tools[tool.name] = tool
        return tool

    def declare(self, name: str, description: str, parameters: dict[str, Any], fn: ToolFn) -> Tool:
        """Register a tool from a declared schema (for tools whose arguments are not a signature)."""
        return self.add(Tool(name, description, parameters, fn))

    def tool(self, name: str | None = None, description: str | None = None) -> Callable[[ToolFn], ToolFn]:
        """Decorator: the schema comes from the signature, the description from the docstring."""

        def deco(fn: ToolFn) -> ToolFn:
            doc = description or inspect.cleandoc(fn.__doc__ or "").split("\n\n")[0].replace("\n", " ")
            self.add(Tool(name or fn.__name__, doc, schema_from_callable(fn), fn))
            return fn

        return deco

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return list(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def subset(self, names: Iterable[str]) -> ToolRegistry:
        """The named tools only (unknown names raise ``KeyError``: a spec error, not a model error)."""
        chosen = []
        for n in names:
            if n not in self._tools:
                raise KeyError(n)
            chosen.append(self._tools[n])
        return ToolRegistry(chosen)

    def specs(self) -> list[dict[str, Any]]:
        return [t.spec() for t in self._tools.values()]

    async def call(self, name: str, arguments: str | dict[str, Any] | None, ctx: ToolContext) -> ToolResult:
        t0 = time.monotonic()
        result = await self._call(name, arguments, ctx)
        return ToolResult(_cap(result.content), result.ok, result.error, result.final, result.data,
                          time.monotonic() - t0)

    async def _call(self, name: str, arguments: str | dict[str, Any] | None, ctx: ToolContext) -> ToolResult:
        tool = self._tools.get(name)
        if tool is None:
            return ToolResult(f"Error: unknown tool {name!r}. Available tools: {', '.join(self._tools)}.",
                              ok=False, error="unknown_tool")
        if arguments is None or arguments == "":
            args: Any = {}
        elif isinstance(arguments, str):
            try:
                args = json.loads(arguments)
            except json.JSONDecodeError as exc:
                return ToolResult(f"Error: the arguments of {name} are not valid JSON ({exc.msg} at position "
                                  f"{exc.pos}). Send a JSON object matching the tool's schema.",
                                  ok=False, error="malformed_arguments")
        else:
            args = arguments
        if not isinstance(args, dict):
            return ToolResult(f"Error: the arguments of {name} must be a JSON object, got {type(args).__name__}.",
                              ok=False, error="malformed_arguments")
        errors = sorted(jsonschema.Draft202012Validator(tool.parameters).iter_errors(args),
                        key=lambda e: list(e.absolute_path))
        if errors:
            lines = [f"{'/'.join(map(str, e.absolute_path)) or '(arguments)'}: {e.message}" for e in errors[:5]]
            return ToolResult(f"Error: invalid arguments for {name}: " + "; ".join(lines),
                              ok=False, error="invalid_arguments")
        try:
            out = await tool.fn(ctx, **args)
        except (ToolError, SandboxError) as exc:
            return ToolResult(f"Error: {exc}", ok=False, error="tool_error")
        except Exception as exc:  # a tool bug must not end the run; the model and the log hear of it
            return ToolResult(f"Error: {name} failed internally: {type(exc).__name__}: {exc}",
                              ok=False, error="internal_error")
        return out if isinstance(out, ToolResult) else ToolResult(str(out))


def _cap(text: str) -> str:
    if len(text) <= MAX_CONTENT_CHARS:
        return text
    half = MAX_CONTENT_CHARS // 2
    return f"{text[:half]}\n... [{len(text) - MAX_CONTENT_CHARS} characters cut] ...\n{text[-half:]}"

"""Tools for agents: a registry of JSON-schema-described tools, the built-ins, and the
sandboxes they run in (``tools.sandbox``)."""

from tools.builtins import BUILTIN_NAMES, builtin_registry
from tools.registry import Tool, ToolContext, ToolError, ToolRegistry, ToolResult

__all__ = ["BUILTIN_NAMES", "Tool", "ToolContext", "ToolError", "ToolRegistry", "ToolResult", "builtin_registry"]

"""Agents: the ``agent`` workflow (a tool-calling loop run as one scheduler program).

Multi-agent pipelines will live here too (issue 6)."""

from agents.loop import AgentLoop, ToolHooks
from agents.spec import AgentInput, SandboxSpec

__all__ = ["AgentInput", "AgentLoop", "SandboxSpec", "ToolHooks"]

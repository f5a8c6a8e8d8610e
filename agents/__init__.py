"""Agents: the ``agent`` workflow (a tool-calling loop run as one scheduler program) and the
``pipeline`` workflow (Mixture-of-Agents layers, ``wait`` or ``staircase``: see docs/pipelines.md)."""

from agents.loop import AgentLoop, ToolHooks
from agents.spec import AgentInput, SandboxSpec

__all__ = ["AgentInput", "AgentLoop", "SandboxSpec", "ToolHooks"]

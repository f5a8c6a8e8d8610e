"""What workflows use besides the run store: the scheduler runtime (every LLM call), the
sandbox pool (every tool command) and the tool registry. Built once per process by the app."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tools.builtins import builtin_registry
from tools.registry import ToolRegistry

if TYPE_CHECKING:
    from orchestrator.metrics import Metrics
    from scheduler.runtime import ProgramRuntime
    from tools.sandbox import SandboxPool


@dataclass
class Services:
    runtime: "ProgramRuntime | None" = None
    sandboxes: "SandboxPool | None" = None
    tools: ToolRegistry = field(default_factory=builtin_registry)
    metrics: "Metrics | None" = None

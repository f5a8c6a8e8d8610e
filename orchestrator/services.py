"""What workflows use besides the run store: the scheduler runtime (every LLM call, through a
``scheduler.session.ProgramSession``), the sandbox pool (every tool command), the tool registry
and the metrics. Built once per process by the app; a workflow reaches it as
``RunContext.services`` (typed, so a workflow cannot ask for something that is not there)."""

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
    """``None``: not running in this process (no backends configured, a bare test context)."""

    runtime: ProgramRuntime | None = None
    sandboxes: SandboxPool | None = None
    tools: ToolRegistry = field(default_factory=builtin_registry)
    metrics: Metrics | None = None

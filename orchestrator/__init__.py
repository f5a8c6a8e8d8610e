"""Agentic, program-aware orchestration service: the control plane.

Public API: ``create_app`` and ``Settings`` for the server; the SDK is the separate
``orchestrator_sdk`` package (``sdk/``), which imports nothing of this one.

The public names are loaded on first use (PEP 562), so that importing a submodule, such as
``orchestrator.cli`` for its client commands, does not load the app, the store and the
scheduler with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.app import create_app
    from orchestrator.runs.context import RunContext
    from orchestrator.runs.states import RunStatus
    from orchestrator.settings import Settings
    from orchestrator.workflows import WorkflowRegistry

_LAZY = {
    "create_app": "orchestrator.app",
    "RunContext": "orchestrator.runs.context",
    "RunStatus": "orchestrator.runs.states",
    "Settings": "orchestrator.settings",
    "WorkflowRegistry": "orchestrator.workflows",
}

__all__ = ["RunContext", "RunStatus", "Settings", "WorkflowRegistry", "create_app"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])

"""Agentic, program-aware orchestration service: the control plane.

Public API: ``create_app`` and ``Settings`` for the server; the SDK lives in
``orchestrator.client`` (``Client``, ``AsyncClient``).
"""

from orchestrator.app import create_app
from orchestrator.runs.context import RunContext
from orchestrator.runs.states import RunStatus
from orchestrator.settings import Settings
from orchestrator.workflows import WorkflowRegistry

__all__ = ["RunContext", "RunStatus", "Settings", "WorkflowRegistry", "create_app"]
__version__ = "0.1.0"

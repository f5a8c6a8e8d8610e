"""Workflow registry, and the registry the service starts with.

The workflows come from the ``orchestrator.workflows`` entry points of the installed packages
(this project's ``echo``, ``demo``, ``sleep``, ``agent``, ``pipeline`` and ``evolve``, in
pyproject.toml), then from ``ORCH_WORKFLOW_MODULES``: the orchestrator imports no workflow
package itself, so the control plane does not depend on the agents or evolve code."""

from __future__ import annotations

from importlib.metadata import entry_points

from orchestrator.workflows.registry import WorkflowDef, WorkflowRegistry

__all__ = ["ENTRY_POINT_GROUP", "WorkflowDef", "WorkflowRegistry", "default_registry"]

ENTRY_POINT_GROUP = "orchestrator.workflows"


def default_registry(extra_modules: list[str] | None = None) -> WorkflowRegistry:
    """Every installed package's workflows (entry points, by name), then ``extra_modules``'."""
    registry = WorkflowRegistry()
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        ep.load()(registry)
    for name in extra_modules or []:
        registry.load_module(name)
    return registry

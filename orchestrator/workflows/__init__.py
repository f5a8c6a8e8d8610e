"""Workflow registry and the built-in workflows."""

from orchestrator.workflows.registry import WorkflowDef, WorkflowRegistry

__all__ = ["WorkflowDef", "WorkflowRegistry", "default_registry"]


def default_registry(extra_modules: list[str] | None = None) -> WorkflowRegistry:
    from agents import pipeline as pipeline_workflow
    from agents import workflow as agent_workflow
    from evolve import workflow as evolve_workflow
    from orchestrator.workflows import builtin

    registry = WorkflowRegistry()
    builtin.register(registry)
    agent_workflow.register(registry)
    evolve_workflow.register(registry)
    pipeline_workflow.register(registry)
    for name in extra_modules or []:
        registry.load_module(name)
    return registry

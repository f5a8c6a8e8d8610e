"""The registry the service starts with: workflows from entry points, then ORCH_WORKFLOW_MODULES.

The control plane imports no workflow package itself: the built-ins arrive through this
project's ``orchestrator.workflows`` entry points (pyproject.toml), as a package of one's own
would, so ``orchestrator`` does not depend on ``agents`` or ``evolve``."""

from __future__ import annotations

import ast
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from orchestrator.workflows import ENTRY_POINT_GROUP, default_registry

ROOT = Path(__file__).resolve().parents[1]


def test_the_built_in_workflows_come_from_entry_points_and_modules_are_added_after() -> None:
    names = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert names["agent"] == "agents.workflow:register" and names["evolve"] == "evolve.workflow:register"
    registry = default_registry(["tests.journal_workflow"])
    assert registry.names() == ["agent", "demo", "echo", "events", "evolve", "journal", "pipeline", "sleep", "steps"]
    with pytest.raises(ValueError, match="already registered"):  # a module cannot shadow an entry point's
        default_registry(["agents.workflow"])


def test_no_module_of_the_control_plane_imports_a_workflow_package() -> None:
    """Not even inside a function (default_registry used to): the registry is built from entry
    points, so ``orchestrator`` could ship without ``agents`` and ``evolve``."""
    offenders = []
    for path in sorted((ROOT / "orchestrator").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names  # type: ignore[attr-defined]
                          if n.split(".")[0] in ("agents", "evolve")]
    assert offenders == []

"""Workflows by name: each is an async function of a ``RunContext`` and a pydantic input."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from collections.abc import Awaitable, Callable, Iterator

from pydantic import BaseModel

if TYPE_CHECKING:
    from orchestrator.runs.context import RunContext
    from orchestrator.settings import TenantLimits

InputT = TypeVar("InputT", bound=BaseModel)
WorkflowFn = Callable[["RunContext", Any], Awaitable[Any]]
# Operator policy on an input the schema accepts, per tenant (say, sandbox ceilings): raises
# ``orchestrator.errors.ValidationFailed`` to refuse the run at submission.
InputCheck = Callable[[Any, "TenantLimits"], None]


@dataclass(frozen=True)
class WorkflowDef(Generic[InputT]):
    name: str
    fn: WorkflowFn
    input_model: type[InputT]
    description: str = ""
    check: InputCheck | None = None

    def check_input(self, inp: InputT, limits: TenantLimits) -> None:
        """Refuse, before anything is written, a valid input this tenant may not run."""
        if self.check is not None:
            self.check(inp, limits)


class WorkflowRegistry:
    def __init__(self) -> None:
        self._defs: dict[str, WorkflowDef[Any]] = {}

    def add(self, defn: WorkflowDef[Any]) -> None:
        if defn.name in self._defs:
            raise ValueError(f"workflow {defn.name!r} is already registered")
        self._defs[defn.name] = defn

    def workflow(self, name: str, input_model: type[InputT], description: str = "", *,
                 check: InputCheck | None = None) -> Callable[[WorkflowFn], WorkflowFn]:
        """Decorator form of ``add``."""

        def deco(fn: WorkflowFn) -> WorkflowFn:
            self.add(WorkflowDef(name, fn, input_model, description or (fn.__doc__ or "").strip(), check))
            return fn

        return deco

    def get(self, name: str) -> WorkflowDef[Any] | None:
        return self._defs.get(name)

    def names(self) -> list[str]:
        return sorted(self._defs)

    def __iter__(self) -> Iterator[WorkflowDef[Any]]:
        return iter(self._defs.values())

    def load_module(self, module_name: str) -> None:
        """Import a module that exposes ``register(registry)`` and let it add its workflows."""
        module = importlib.import_module(module_name)
        register = getattr(module, "register", None)
        if register is None:
            raise ValueError(f"workflow module {module_name!r} has no register(registry) function")
        register(self)

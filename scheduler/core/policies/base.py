"""The policy interface and the registry that selects one by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from scheduler.core.state import BackendView, Program

if TYPE_CHECKING:
    from scheduler.core.scheduler import Scheduler

_REGISTRY: dict[str, Callable[..., Policy]] = {}


def register(name: str) -> Callable[[type[Policy]], type[Policy]]:
    def deco(cls: type[Policy]) -> type[Policy]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def make_policy(name: str, **options: Any) -> Policy:
    """The policy ``name`` with ``options``; an option it does not have is a ``ValueError`` that
    lists the ones it has (a configuration typo should say what was meant)."""
    cls = policy_class(name)
    known = list(inspect.signature(cls).parameters)  # a class's signature is its __init__'s, less self
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"policy {name!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(known) or 'none'}")
    return cls(**options)


def policy_class(name: str) -> type[Policy]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]  # type: ignore[return-value]


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


class Policy:
    """Hooks the core calls after updating its tables. A policy acts through the
    scheduler's actions (``dispatch``, ``pause``, ``resume``, ``pin``...)."""

    name = "policy"
    tick_s: float = 1.0  # how often a driver should send ``Tick``
    # The SGLang flags this policy is designed for (the simulator runs each policy's engines
    # with them; deploy/helm sets them on the backends). SGLang's defaults: FCFS, LRU eviction.
    engine_flags: ClassVar[dict[str, object]] = {}
    ranks_kv: bool = False  # its dispatches carry ``retain_until`` (needs priority eviction)

    def attach(self, sched: Scheduler) -> None:
        self.s = sched

    def on_request(self, p: Program, new: bool, now: float) -> None: ...

    def on_finished(self, p: Program, now: float) -> None: ...

    def on_tool_start(self, p: Program, now: float) -> None: ...

    def on_tool_end(self, p: Program, now: float) -> None: ...

    def on_release(self, p: Program, now: float) -> None: ...

    def after_release(self, now: float) -> None: ...

    def on_backend(self, b: BackendView, now: float) -> None: ...

    def on_tick(self, now: float) -> None: ...

    def fits_alone(self, p: Program, b: BackendView) -> bool:
        """Could ``p`` be admitted on ``b`` were nothing else there? Where a policy says no for
        every backend it would hold ``p``'s call for ever; the core then sends it anyway and
        lets the engine judge it (it runs, or is refused as longer than the model's context)."""
        return True


def cache_aware_pick(p: Program, backends: list[BackendView], *, abs_threshold: int = 32,
                     rel_threshold: float = 1.5) -> BackendView:
    """SGLang's gateway rule: if load is imbalanced (both thresholds exceeded) send to the
    least loaded; otherwise to the backend with the best prefix match, which for a program
    is the one that served its previous turns; with no match, the least loaded."""
    def load(b: BackendView) -> int:
        return b.inflight

    least = min(backends, key=lambda b: (load(b), b.name))
    most = max(backends, key=load)
    imbalanced = load(most) - load(least) > abs_threshold and load(most) > rel_threshold * load(least)
    if not imbalanced and p.backend is not None:
        for b in backends:
            if b.name == p.backend:
                return b
    return least

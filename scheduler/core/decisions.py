"""What the scheduler core decides. A driver (the gateway against real backends, or the
virtual-time driver against the simulator) carries them out. A request that got no
``Dispatch`` is held: that is how a program is paused on an engine with no pause API."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Send a held request to ``backend``. ``priority`` orders the engine's queue (SGLang's
    ``--enable-priority-scheduling``). ``retain_until`` ranks the KV the call leaves behind for
    eviction (``--radix-eviction-policy priority``): it is evicted before KV ranked later. A
    policy sets one or the other, since SGLang has only one ``priority`` field."""

    rid: str
    program_id: str
    backend: str
    priority: int | None = None
    retain_until: float | None = None


@dataclass(frozen=True, slots=True)
class Pause:
    program_id: str
    backend: str | None


@dataclass(frozen=True, slots=True)
class Resume:
    program_id: str
    backend: str


@dataclass(frozen=True, slots=True)
class Pin:
    """Keep this program's KV (only where the engine has a lever for it: the simulator's
    radix lock stands in for Continuum's pin; SGLang has none)."""

    program_id: str
    backend: str


@dataclass(frozen=True, slots=True)
class Retain:
    """Rank this program's cached KV on ``backend`` as if used at ``until`` (core clock), so it
    outlives KV used before then. On SGLang with priority eviction: a one-token request over the
    program's context whose ``priority`` is ``until``, which raises every node of the path (a
    node keeps the highest priority that touched it; it lapses as later calls outrank it)."""

    program_id: str
    backend: str
    until: float


@dataclass(frozen=True, slots=True)
class Unpin:
    program_id: str
    backend: str


@dataclass(frozen=True, slots=True)
class PrepareSandbox:
    program_id: str


@dataclass(frozen=True, slots=True)
class CollectSandbox:
    program_id: str


Decision = Dispatch | Pause | Resume | Pin | Retain | Unpin | PrepareSandbox | CollectSandbox

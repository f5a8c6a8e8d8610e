"""What the scheduler core decides. A driver (the gateway against real backends, or the
virtual-time driver against the simulator) carries them out. A request that got no
``Dispatch`` is held: that is how a program is paused on an engine with no pause API."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Dispatch:
    rid: str
    program_id: str
    backend: str
    priority: int | None = None


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
class Unpin:
    program_id: str
    backend: str


@dataclass(frozen=True, slots=True)
class PrepareSandbox:
    program_id: str


@dataclass(frozen=True, slots=True)
class CollectSandbox:
    program_id: str


Decision = Dispatch | Pause | Resume | Pin | Unpin | PrepareSandbox | CollectSandbox

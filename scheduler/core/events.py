"""What the scheduler core is told. Every event carries ``now`` (seconds, any epoch):
the core never reads a clock, so the same code runs in real and virtual time."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestArrived:
    now: float
    program_id: str
    rid: str
    prompt_tokens: int  # estimate until usage corrects it
    tenant: str = "default"
    max_tokens: int = 256
    prefix_key: str | None = None  # a prefix many programs share (a system prompt)
    prefix_tokens: int = 0
    backends: tuple[str, ...] | None = None  # only these may serve it (a model / backend choice)


@dataclass(frozen=True, slots=True)
class RequestFinished:
    now: float
    rid: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    tool: str | None = None  # the answer ends in a call of this tool: the program starts acting
    aborted: bool = False


@dataclass(frozen=True, slots=True)
class ToolStarted:
    """An explicit tool-phase hint (the gateway infers it from a tool-call answer anyway)."""

    now: float
    program_id: str
    tool: str


@dataclass(frozen=True, slots=True)
class ToolEnded:
    now: float
    program_id: str


@dataclass(frozen=True, slots=True)
class ProgramReleased:
    now: float
    program_id: str


@dataclass(frozen=True, slots=True)
class BackendObserved:
    """What a backend reports: capacity from ``/get_server_info``, live use from ``/v1/loads``."""

    now: float
    backend: str
    capacity_tokens: int
    used_tokens: int = 0
    running: int = 0
    queued: int = 0
    healthy: bool = True
    # it evicts cached KV by request priority (SGLang's --radix-eviction-policy priority, and
    # no --enable-priority-scheduling, which would read the same field as queue order); None: as before
    ranks_kv: bool | None = None


@dataclass(frozen=True, slots=True)
class Tick:
    now: float


Event = RequestArrived | RequestFinished | ToolStarted | ToolEnded | ProgramReleased | BackendObserved | Tick

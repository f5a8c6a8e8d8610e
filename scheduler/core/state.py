"""The program table and the backend view: what the scheduler knows."""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field


class Phase(str, enum.Enum):
    REASONING = "reasoning"  # an LLM call is in flight or waiting for dispatch
    ACTING = "acting"        # a tool runs; no LLM call


class Status(str, enum.Enum):
    WAITING = "waiting"      # new: admitted to no backend yet
    ACTIVE = "active"        # its requests are dispatched as they come
    PAUSED = "paused"        # its next request is held until it is resumed
    FINISHED = "finished"


@dataclass(slots=True)
class PendingRequest:
    rid: str
    prompt_tokens: int
    max_tokens: int
    arrived: float


@dataclass(slots=True)
class Program:
    id: str
    tenant: str
    created: float
    phase: Phase = Phase.REASONING
    status: Status = Status.WAITING
    tokens: int = 0                 # context: last prompt + its completion (what its KV holds)
    max_tokens: int = 256           # of the request in flight (decode headroom)
    backend: str | None = None      # where its KV is (or was last)
    prefix_key: str | None = None
    prefix_tokens: int = 0
    pending: deque[PendingRequest] = field(default_factory=deque)
    inflight: set[str] = field(default_factory=set)
    tool: str | None = None
    tool_started: float | None = None
    steps: int = 0                  # reasoning + acting periods completed
    requests: int = 0
    prompt_tokens_total: int = 0
    cached_tokens_total: int = 0
    completion_tokens_total: int = 0
    attained: float = 0.0           # service received, for least-attained-service fairness
    paused_at: float | None = None
    pinned: bool = False
    pin_until: float | None = None
    retain_until: float | None = None  # its KV ranked for eviction as if used then (Retain)
    kept: bool = True               # an acting program's KV counts as resident
    sandbox_ready: bool = False
    allowed: frozenset[str] | None = None  # backends that may serve it; None: any
    last_change: float = 0.0
    settled_tokens: int = 0         # ``tokens`` as of its last call that finished (not estimated)
    held_s: float = 0.0             # seconds its calls waited for dispatch (for memory), all told

    def held(self, now: float) -> float:
        """Seconds its calls have waited for dispatch, the one waiting now included."""
        return self.held_s + (now - self.pending[0].arrived if self.pending else 0.0)

    def time_in_tool(self, now: float) -> float:
        return now - self.tool_started if self.phase is Phase.ACTING and self.tool_started is not None else 0.0

    def snapshot(self) -> dict[str, object]:
        return {"id": self.id, "tenant": self.tenant, "phase": self.phase.value, "status": self.status.value,
                "tokens": self.tokens, "backend": self.backend, "steps": self.steps, "requests": self.requests,
                "pending": len(self.pending), "inflight": len(self.inflight), "tool": self.tool,
                "pinned": self.pinned, "cached_tokens": self.cached_tokens_total,
                "prompt_tokens": self.prompt_tokens_total, "completion_tokens": self.completion_tokens_total,
                "held_s": round(self.held_s, 3)}


@dataclass(slots=True)
class BackendView:
    name: str
    capacity: int                   # KV tokens (max_total_num_tokens)
    used: int = 0                   # observed
    running: int = 0
    queued: int = 0
    healthy: bool = True
    observed_at: float = 0.0
    inflight: int = 0               # requests we dispatched and have not seen finish
    prefill_s_per_token: float = 4e-5  # recompute cost, for keep/release decisions
    ranks_kv: bool = False          # evicts cached KV by request priority (see BackendObserved)

"""Run states and the transitions between them.

``queued -> running <-> waiting -> succeeded | failed | cancelled | timed_out``;
``cancelling`` sits between a cancel request and the owner stopping the run.
"""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.TIMED_OUT})
# States in which a worker holds the run under a lease.
LEASED = frozenset({RunStatus.RUNNING, RunStatus.WAITING, RunStatus.CANCELLING})
ACTIVE = frozenset({RunStatus.QUEUED}) | LEASED

ALLOWED: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.QUEUED: frozenset({RunStatus.RUNNING, RunStatus.CANCELLED}),
    RunStatus.RUNNING: frozenset({RunStatus.WAITING, RunStatus.CANCELLING} | TERMINAL),
    RunStatus.WAITING: frozenset({RunStatus.RUNNING, RunStatus.CANCELLING} | TERMINAL),
    RunStatus.CANCELLING: frozenset({RunStatus.CANCELLED, RunStatus.FAILED, RunStatus.TIMED_OUT, RunStatus.SUCCEEDED}),
}


def can_transition(src: RunStatus, dst: RunStatus) -> bool:
    return dst in ALLOWED.get(src, frozenset())


# Event type written when a run reaches each terminal state.
FINAL_EVENT = {status: f"run.{status.value}" for status in TERMINAL}

"""What a workflow sees while it runs: checkpointed steps, durable events and waits.

Replay works like DBOS: a workflow function is deterministic in the order of its
``step`` / ``emit`` / ``sleep`` calls, so the n-th call of a replay maps to the
n-th call of the first execution. A step whose checkpoint says ``completed`` is
not run again; its stored output is returned.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any, TypeVar
from collections.abc import Awaitable, Callable, Iterable

from orchestrator.runs.journal import Journal
from orchestrator.runs.records import RunRecord, StepRecord
from orchestrator.runs.store import Lease, LeaseLost, RunStore, StepWrite
from orchestrator.services import Services

if TYPE_CHECKING:
    from scheduler.runtime import ProgramRuntime

T = TypeVar("T")


class StepError(Exception):
    """A step raised; the run fails unless the workflow catches this."""

    def __init__(self, name: str, error: dict[str, Any]) -> None:
        super().__init__(f"step {name!r} failed: {error.get('message')}")
        self.name = name
        self.error = error


class RunFailed(Exception):
    """Raised by a workflow to fail its run with a stable error ``code`` and a message for the user
    (a missing backend, a spec the service cannot honour...), rather than a generic workflow error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RunContext:
    def __init__(
        self,
        store: RunStore,
        lease: Lease,
        run: RunRecord,
        completed: dict[int, StepRecord],
        on_step: Callable[[str], None] | None = None,
        services: Services | None = None,
        lease_valid: Callable[[], bool] | None = None,
        journal: Journal | None = None,
        logged_keys: set[str] | None = None,
    ) -> None:
        self.store = store
        self.lease = lease
        # Writes go through the journal: a step's start, end and the events around it share
        # transactions (see ``journal``). ``logged_keys``: op_keys an earlier attempt wrote.
        self.journal = journal if journal is not None else Journal(store, lease)
        self._logged_keys = logged_keys or set()
        self.run_id = run.id
        self.tenant = run.tenant
        self.workflow = run.workflow
        self.attempt = run.attempt
        self.metadata = run.metadata
        self._completed = completed
        self._next_step = 0
        self._next_emit = 0
        self._on_step = on_step or (lambda _status: None)
        # What workflows call besides the store: the scheduler runtime, sandboxes, tools, metrics
        self.services: Services = services if services is not None else Services()
        # The worker's local verdict on the lease (``worker.LeaseClock``): no database round trip.
        self._lease_valid = lease_valid or (lambda: True)

    def runtime(self, backends: Iterable[str] = ()) -> ProgramRuntime:
        """The scheduler runtime this run's LLM calls go through (open a
        ``scheduler.session.ProgramSession`` on it per program). The run fails with
        ``no_backends`` where none is configured, and ``unknown_backend`` when one of
        ``backends`` (names the input chose) is not."""
        runtime = self.services.runtime
        if runtime is None:
            raise RunFailed("no_backends", f"The {self.workflow} workflow needs an LLM backend; "
                                           "configure ORCH_BACKENDS.")
        unknown = sorted(set(backends) - set(runtime.backends))
        if unknown:
            raise RunFailed("unknown_backend", f"No backend {', '.join(map(repr, unknown))} here; configured: "
                                               f"{', '.join(sorted(runtime.backends))}.")
        return runtime

    async def step(self, name: str, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` once; its JSON-serialisable result is checkpointed before this returns."""
        step_id = self._next_step
        self._next_step += 1
        done = self._completed.get(step_id)
        if done is not None:
            self._on_step("replayed")
            return done.output
        self._check_lease()
        started = time.time()
        self.journal.event("step.started", {"step_id": step_id, "name": name, "attempt": self.attempt})
        self.journal.step(StepWrite(step_id, name, "running", self.attempt, started))
        self.journal.flush_soon()
        try:
            output = await fn(*args, **kwargs)
            json.dumps(output)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = {"code": "step_error", "type": type(exc).__name__, "message": str(exc)}
            self._end_step(step_id, name, started, error=error)
            await self.journal.flush()
            self._on_step("failed")
            raise StepError(name, error) from exc
        self._end_step(step_id, name, started, output=output)
        await self.journal.flush()  # the checkpoint is durable before the workflow goes on
        self._on_step("completed")
        return output

    def _end_step(self, step_id: int, name: str, started: float, *, output: Any = None,
                  error: dict[str, Any] | None = None) -> None:
        status = "failed" if error else "completed"
        data: dict[str, Any] = {"step_id": step_id, "name": name}
        if error:
            data["error"] = error
        self.journal.event(f"step.{status}", data)
        self.journal.step(StepWrite(step_id, name, status, self.attempt, started, output=output, error=error,
                                    finished_at=time.time()))

    def _check_lease(self) -> None:
        """Refuse to start a step on a lease that may have expired: fencing would keep a stale
        worker's writes out of the log, but not the side effects of the step function itself."""
        if not self._lease_valid():
            raise LeaseLost(self.run_id)

    async def emit(self, type_: str, data: dict[str, Any], *, key: str | None = None) -> None:
        """Append an event to the run's stream; a replay does not write it twice.

        The event is written in the background, batched with others, and at the latest with the
        next step's checkpoint or the run's outcome; its place in the stream is the order of the
        calls. Without ``key`` the n-th emit of a replay is the n-th of the first execution and
        is skipped when that one was logged; a caller that keys its events itself (a key unique
        within the run) decides what a replay repeats.
        """
        if key is None:
            key = f"emit:{self._next_emit}"
            self._next_emit += 1
        if key in self._logged_keys:
            return
        await self.journal.emit(type_, data, op_key=key)

    async def sleep(self, seconds: float) -> None:
        """Wait in state ``waiting``; the wake-up time is a checkpoint, so a restart waits only the rest."""
        wake_at = await self.step("sleep", _now_plus, seconds)
        remaining = wake_at - time.time()
        if remaining <= 0:
            return
        await self.journal.flush()  # events before the wait come before ``run.waiting``
        await self.store.set_waiting(self.lease, True, {"until": wake_at})
        await asyncio.sleep(remaining)
        await self.journal.flush()
        await self.store.set_waiting(self.lease, False, {})


async def _now_plus(seconds: float) -> float:
    return time.time() + seconds

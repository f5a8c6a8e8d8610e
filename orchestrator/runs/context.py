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

from orchestrator.runs.records import RunRecord, StepRecord
from orchestrator.runs.store import Lease, LeaseLost, RunStore
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
    ) -> None:
        self.store = store
        self.lease = lease
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
        await self.store.start_step(self.lease, step_id, name, self.attempt)
        self._check_lease()  # the write may have taken long, or this process may have been paused
        try:
            output = await fn(*args, **kwargs)
            json.dumps(output)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = {"code": "step_error", "type": type(exc).__name__, "message": str(exc)}
            await self.store.end_step(self.lease, step_id, name, error=error)
            self._on_step("failed")
            raise StepError(name, error) from exc
        await self.store.end_step(self.lease, step_id, name, output=output)
        self._on_step("completed")
        return output

    def _check_lease(self) -> None:
        """Refuse to start a step on a lease that may have expired: fencing would keep a stale
        worker's writes out of the log, but not the side effects of the step function itself."""
        if not self._lease_valid():
            raise LeaseLost(self.run_id)

    async def emit(self, type_: str, data: dict[str, Any]) -> None:
        """Append an event to the run's stream; a replay does not write it twice."""
        key = f"emit:{self._next_emit}"
        self._next_emit += 1
        await self.store.emit(self.lease, type_, data, op_key=key)

    async def sleep(self, seconds: float) -> None:
        """Wait in state ``waiting``; the wake-up time is a checkpoint, so a restart waits only the rest."""
        wake_at = await self.step("sleep", _now_plus, seconds)
        remaining = wake_at - time.time()
        if remaining <= 0:
            return
        await self.store.set_waiting(self.lease, True, {"until": wake_at})
        await asyncio.sleep(remaining)
        await self.store.set_waiting(self.lease, False, {})


async def _now_plus(seconds: float) -> float:
    return time.time() + seconds

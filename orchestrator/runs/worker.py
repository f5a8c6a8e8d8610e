"""The worker: claims queued runs, keeps their leases alive, recovers runs of dead workers.

Every service process runs one. Runs are executed as asyncio tasks; a lost lease,
a cancel request or a deadline stops the task. Nothing here writes without the
run's fencing epoch (see ``RunStore``).

Fencing keeps a stale worker out of the log, not out of the world: the side effects of
its steps are not fenced. So a worker also keeps its own clock on every lease
(``LeaseClock``) and stops an execution before the lease may have expired in the
database, whether or not the heartbeat query ever answers; a workflow's step does
not start on a lease past that local deadline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from pydantic_core import to_jsonable_python

from orchestrator.ids import new_id
from orchestrator.metrics import Metrics
from orchestrator.runs.context import RunContext, RunFailed, StepError
from orchestrator.runs.records import RunRecord
from orchestrator.runs.states import RunStatus
from orchestrator.runs.journal import Journal
from orchestrator.runs.store import CONTROL_CHANNEL, Lease, LeaseLost, LivenessLock, Outcome, RunStore
from orchestrator.services import Services
from orchestrator.settings import Settings
from orchestrator.workflows.registry import WorkflowRegistry

log = logging.getLogger(__name__)

# The part of a lease a worker does not count on: it covers clock skew between hosts (the
# database's expiry is in the renewing worker's wall-clock time, compared with another's)
# and the time between the watchdog's check and the execution actually stopping.
LEASE_SAFETY_FRACTION = 0.2


@dataclass
class LeaseClock:
    """How long this worker may still count on a lease, by its own monotonic clock.

    The database's ``lease_expires_at`` is the wall-clock time of the renewing query plus
    the lease. Counting from a monotonic reading taken *before* that query was sent puts
    the local deadline no later than the database's, whatever the query's latency, and a
    process that was paused (SIGSTOP, a frozen VM, a stalled event loop) finds the lease
    stale as soon as it runs again, without asking the database.
    """

    valid_for: float  # the lease less its safety margin
    renewed_at: float  # time.monotonic() before the claim or heartbeat that renewed it was sent

    def renew(self, sent_at: float) -> None:
        self.renewed_at = max(self.renewed_at, sent_at)

    def valid(self) -> bool:
        return time.monotonic() < self.renewed_at + self.valid_for


@dataclass
class _Execution:
    lease: Lease
    clock: LeaseClock
    task: asyncio.Task[None] = field(init=False)
    stop_reason: str | None = None  # "cancel", "lost" or "shutdown"
    finishing: bool = False  # the outcome is being written: too late to interrupt
    started: float = field(default_factory=time.time)


class Worker:
    def __init__(self, store: RunStore, registry: WorkflowRegistry, settings: Settings, metrics: Metrics,
                 services: Services | None = None) -> None:
        self.store = store
        self.services = services
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.id = new_id("wrk")
        self._running: dict[str, _Execution] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._last_recovery = 0.0
        self._last_dead_check = 0.0
        self._liveness: LivenessLock | None = None
        self._stopping = False
        self._lease_valid_for = settings.lease_seconds * (1 - LEASE_SAFETY_FRACTION)

    @property
    def executing(self) -> int:
        return len(self._running)

    async def start(self) -> None:
        await self._register()
        self._loops = [
            asyncio.create_task(self._claim_loop(), name="worker-claim"),
            asyncio.create_task(self._heartbeat_loop(), name="worker-heartbeat"),
            asyncio.create_task(self._control_loop(), name="worker-control"),
            asyncio.create_task(self._watchdog_loop(), name="worker-watchdog"),
        ]
        log.info("worker started", extra={"worker": self.id})

    async def _register(self) -> None:
        """Take this worker's liveness lock (PostgreSQL), then write its row."""
        self._liveness = await self.store.hold_liveness(self.id)
        if self._liveness is not None:
            self._liveness.on_lost(self._liveness_lost)
        await self.store.register_worker(self.id, socket.gethostname(), os.getpid(),
                                         liveness_lock=self._liveness is not None)

    def _liveness_lost(self) -> None:
        """The session holding our liveness lock ended: other workers may take our runs over now.

        Stop every execution at once, claim nothing until a new session holds a new lock, and
        come back under a new id (the old one may be marked dead by then).
        """
        if self._stopping:
            return
        log.error("liveness session lost; stopping %d executions", len(self._running), extra={"worker": self.id})
        for run_id in list(self._running):
            self._stop(run_id, "lost")

    async def _restore_liveness(self) -> bool:
        """Whether this worker holds its liveness lock, after trying to take a new one if not."""
        if self._liveness is None or not self._liveness.lost:
            return True
        self._liveness_lost()  # in case the listener did not fire
        old = self._liveness
        self._liveness = None
        try:
            await old.close()
        except Exception:
            log.debug("closing the lost liveness connection failed", exc_info=True)
        self.id = new_id("wrk")
        try:
            await self._register()
        except Exception:
            log.exception("could not take a new liveness lock")
            self._liveness = old  # still lost: try again on the next pass
            return False
        log.warning("liveness restored under a new worker id", extra={"worker": self.id})
        return True

    async def stop(self) -> None:
        """Stop claiming, interrupt running executions and hand their runs back at once."""
        self._stopping = True
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        execs = list(self._running.values())
        for ex in execs:
            ex.stop_reason = "shutdown"
            ex.task.cancel()
        await asyncio.gather(*(ex.task for ex in execs), return_exceptions=True)
        try:
            await self.store.release([ex.lease for ex in execs])
            await self.store.retire_worker(self.id)
        except Exception:  # the database may already be gone; leases then expire by themselves
            log.exception("could not release leases on shutdown")
        if self._liveness is not None:
            try:
                await self._liveness.close()
            except Exception:
                log.debug("closing the liveness connection failed", exc_info=True)

    # ---- loops -------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while True:
            try:
                await self._claim_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("claim failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.worker_poll_seconds)
            except TimeoutError:
                pass
            self._wake.clear()

    async def _claim_once(self) -> None:
        s = self.settings
        if not await self._restore_liveness():
            return
        now = time.time()
        if now - self._last_dead_check >= s.worker_poll_seconds:
            # runs of a worker whose session is gone are taken over now, not at lease expiry
            self._last_dead_check = now
            if await self.store.expire_dead_owners(self.id):
                self._last_recovery = 0.0
        free = s.worker_concurrency - len(self._running)
        if free > 0 and now - self._last_recovery >= min(s.lease_seconds / 2, s.heartbeat_seconds):
            self._last_recovery = now
            sent = time.monotonic()
            reclaimed, expired = await self.store.reclaim_expired(self.id, free, s.lease_seconds, s.max_attempts,
                                                                  exclude=list(self._running))
            self.metrics.lease_expiries.inc(expired)
            self.metrics.recoveries.inc(len(reclaimed))
            for lease, run in reclaimed:
                log.info("recovered run", extra={"run_id": lease.run_id, "attempt": run.attempt})
                self._spawn(lease, run, sent)
            free -= len(reclaimed)
        if free > 0:
            sent = time.monotonic()
            for lease, run in await self.store.claim_queued(self.id, free, s.lease_seconds):
                self.metrics.queue_wait.labels(run.workflow).observe(max(0.0, time.time() - run.created_at))
                self._spawn(lease, run, sent)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            await self._heartbeat_once()

    async def _heartbeat_once(self) -> None:
        """Renew the leases of the executions that still hold theirs.

        A stale one is stopped first rather than renewed: it may have gone on past its
        deadline only because this process was paused, and the run is left to whoever
        claims it once the database's lease expires. The query is not given a timeout:
        cancelling a transaction midway can leave its connection holding locks (SQLite's
        write lock), and the watchdog stops the executions of a heartbeat that hangs.
        """
        self._stop_stale()
        if self._liveness is not None and self._liveness.lost:
            self._liveness_lost()  # renew nothing: others may already be taking these runs over
            return
        execs = [ex for ex in self._running.values() if ex.stop_reason != "lost"]
        sent = time.monotonic()
        try:
            lost, cancel = await self.store.heartbeat(self.id, [ex.lease for ex in execs],
                                                      self.settings.lease_seconds)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("heartbeat failed")
            return
        for ex in execs:
            if ex.lease.run_id not in lost:
                ex.clock.renew(sent)
        for run_id in lost:
            self._stop(run_id, "lost")
        for run_id in cancel:
            self._stop(run_id, "cancel")

    async def _watchdog_loop(self) -> None:
        """Stop executions whose lease may have expired, by this process's clock alone.

        Apart from the heartbeat on purpose: a heartbeat query that hangs (a database or a
        network that stopped answering) must not keep the worker from noticing.
        """
        period = self.settings.lease_seconds * LEASE_SAFETY_FRACTION / 2
        while True:
            await asyncio.sleep(period)
            self._stop_stale()

    def _stop_stale(self) -> None:
        for run_id, ex in list(self._running.items()):
            if not ex.clock.valid():
                self._stop(run_id, "lost")

    async def _control_loop(self) -> None:
        async with self.store.bus.subscribe(CONTROL_CHANNEL) as sub:
            while True:
                msg = await sub.get()
                if msg is None:
                    continue
                if msg.get("type") == "queued":
                    self._wake.set()
                elif msg.get("type") == "cancel":
                    self._stop(msg.get("run_id", ""), "cancel")

    # ---- executions --------------------------------------------------------------

    def _stop(self, run_id: str, reason: str) -> None:
        ex = self._running.get(run_id)
        if ex is not None and ex.stop_reason is None and not ex.finishing:
            ex.stop_reason = reason
            ex.task.cancel()

    def _spawn(self, lease: Lease, run: RunRecord, sent: float) -> None:
        """Execute a claimed run; ``sent``: ``time.monotonic()`` before the claim was sent."""
        ex = _Execution(lease, LeaseClock(self._lease_valid_for, sent))
        ex.task = asyncio.create_task(self._execute(ex, run), name=f"run-{lease.run_id}")
        self._running[lease.run_id] = ex
        self.metrics.runs_executing.set(len(self._running))
        ex.task.add_done_callback(lambda _t: self._done(ex))

    def _done(self, ex: _Execution) -> None:
        """Forget a finished execution; its lease, if it lost it, is counted here once."""
        self._running.pop(ex.lease.run_id, None)  # one execution per run: reclaim_expired excludes ours
        if ex.stop_reason == "lost":
            self.metrics.leases_lost.inc()
            log.warning("lease lost", extra={"run_id": ex.lease.run_id})
        self.metrics.runs_executing.set(len(self._running))
        self._wake.set()

    async def _execute(self, ex: _Execution, run: RunRecord) -> None:
        lease = ex.lease
        journal = Journal(self.store, lease, on_lost=lambda: self._stop(lease.run_id, "lost"))
        try:
            try:
                status, output, error = await self._run_workflow(ex, run, journal)
            except LeaseLost:
                ex.stop_reason = ex.stop_reason or "lost"
                return
            if ex.stop_reason in ("lost", "shutdown"):
                return
            if not ex.clock.valid():  # the outcome would be written on a lease that may be gone
                ex.stop_reason = "lost"
                return
            ex.finishing = True
            try:
                # what the journal still holds goes in the same transaction as the outcome
                await journal.flush(Outcome(status, output, error))
            except LeaseLost:
                ex.stop_reason = "lost"
                return
        finally:
            await journal.close()
        self.metrics.runs_finished.labels(run.workflow, status.value).inc()
        started = run.started_at or time.time()
        self.metrics.run_duration.labels(run.workflow).observe(max(0.0, time.time() - started))
        log.info("run finished", extra={"run_id": lease.run_id, "status": status.value})

    async def _run_workflow(self, ex: _Execution, run: RunRecord,
                            journal: Journal) -> tuple[RunStatus, Any, dict[str, Any] | None]:
        lease = ex.lease
        defn = self.registry.get(run.workflow)
        if defn is None:
            return RunStatus.FAILED, None, {"code": "unknown_workflow",
                                            "message": f"No workflow {run.workflow!r} in this service."}
        if run.cancel_requested:
            return RunStatus.CANCELLED, None, {"code": "cancelled", "message": "Cancelled."}
        try:
            inp = defn.input_model.model_validate(run.input)
        except ValidationError as exc:
            return RunStatus.FAILED, None, {"code": "invalid_input", "message": str(exc)}
        # a first attempt has nothing to replay (a fork has its copied checkpoints): no query for it
        replay = run.attempt > 1 or run.forked_from is not None
        completed, logged = await self.store.replay_state(lease.run_id) if replay else ({}, set())
        ctx = RunContext(self.store, lease, run, completed, on_step=lambda st: self.metrics.steps.labels(st).inc(),
                         services=self.services, lease_valid=ex.clock.valid, journal=journal, logged_keys=logged)
        deadline = run.deadline_at
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        try:
            async with asyncio.timeout(timeout) as cm:
                output = to_jsonable_python(await defn.fn(ctx, inp))
        except asyncio.CancelledError:
            if ex.stop_reason == "cancel":
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                return RunStatus.CANCELLED, None, {"code": "cancelled", "message": "Cancelled by request."}
            raise
        except TimeoutError:
            if cm.expired():
                return RunStatus.TIMED_OUT, None, {"code": "timeout",
                                                   "message": f"Run exceeded its timeout of {run.timeout_seconds} s."}
            return RunStatus.FAILED, None, {"code": "workflow_error", "type": "TimeoutError", "message": "timed out"}
        except LeaseLost:
            raise
        except StepError as exc:
            return RunStatus.FAILED, None, {**exc.error, "step": exc.name}
        except RunFailed as exc:
            return RunStatus.FAILED, None, {"code": exc.code, "message": exc.message}
        except Exception as exc:
            log.exception("workflow raised", extra={"run_id": lease.run_id})
            return RunStatus.FAILED, None, {"code": "workflow_error", "type": type(exc).__name__, "message": str(exc)}
        return RunStatus.SUCCEEDED, output, None

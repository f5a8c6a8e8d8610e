"""The worker: claims queued runs, keeps their leases alive, recovers runs of dead workers.

Every service process runs one. Runs are executed as asyncio tasks; a lost lease,
a cancel request or a deadline stops the task. Nothing here writes without the
run's fencing epoch (see ``RunStore``).
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
from orchestrator.runs.states import RunStatus
from orchestrator.runs.store import CONTROL_CHANNEL, Lease, LeaseLost, RunStore
from orchestrator.settings import Settings
from orchestrator.workflows.registry import WorkflowRegistry

log = logging.getLogger(__name__)


@dataclass
class _Execution:
    lease: Lease
    task: asyncio.Task[None]
    stop_reason: str | None = None  # "cancel", "lost" or "shutdown"
    finishing: bool = False  # the outcome is being written: too late to interrupt
    started: float = field(default_factory=time.time)


class Worker:
    def __init__(self, store: RunStore, registry: WorkflowRegistry, settings: Settings, metrics: Metrics,
                 services: Any = None) -> None:
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

    @property
    def executing(self) -> int:
        return len(self._running)

    async def start(self) -> None:
        await self.store.register_worker(self.id, socket.gethostname(), os.getpid())
        self._loops = [
            asyncio.create_task(self._claim_loop(), name="worker-claim"),
            asyncio.create_task(self._heartbeat_loop(), name="worker-heartbeat"),
            asyncio.create_task(self._control_loop(), name="worker-control"),
        ]
        log.info("worker started", extra={"worker": self.id})

    async def stop(self) -> None:
        """Stop claiming, interrupt running executions and hand their runs back at once."""
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
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def _claim_once(self) -> None:
        s = self.settings
        free = s.worker_concurrency - len(self._running)
        now = time.time()
        if free > 0 and now - self._last_recovery >= min(s.lease_seconds / 2, s.heartbeat_seconds):
            self._last_recovery = now
            reclaimed, expired = await self.store.reclaim_expired(self.id, free, s.lease_seconds, s.max_attempts)
            self.metrics.lease_expiries.inc(expired)
            self.metrics.recoveries.inc(len(reclaimed))
            for lease, run in reclaimed:
                log.info("recovered run", extra={"run_id": lease.run_id, "attempt": run["attempt"]})
                self._spawn(lease, run)
            free -= len(reclaimed)
        if free > 0:
            for lease, run in await self.store.claim_queued(self.id, free, s.lease_seconds):
                self.metrics.queue_wait.labels(run["workflow"]).observe(max(0.0, time.time() - run["created_at"]))
                self._spawn(lease, run)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            try:
                leases = [ex.lease for ex in self._running.values()]
                lost, cancel = await self.store.heartbeat(self.id, leases, self.settings.lease_seconds)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("heartbeat failed")
                continue
            for run_id in lost:
                self.metrics.leases_lost.inc()
                self._stop(run_id, "lost")
            for run_id in cancel:
                self._stop(run_id, "cancel")

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

    def _spawn(self, lease: Lease, run: dict[str, Any]) -> None:
        task = asyncio.create_task(self._execute(lease, run), name=f"run-{lease.run_id}")
        self._running[lease.run_id] = _Execution(lease, task)
        self.metrics.runs_executing.set(len(self._running))
        task.add_done_callback(lambda _t, rid=lease.run_id: self._done(rid))

    def _done(self, run_id: str) -> None:
        self._running.pop(run_id, None)
        self.metrics.runs_executing.set(len(self._running))
        self._wake.set()

    async def _execute(self, lease: Lease, run: dict[str, Any]) -> None:
        try:
            status, output, error = await self._run_workflow(lease, run)
        except LeaseLost:
            self.metrics.leases_lost.inc()
            log.warning("lease lost", extra={"run_id": lease.run_id})
            return
        ex = self._running.get(lease.run_id)
        if ex is not None:
            if ex.stop_reason in ("lost", "shutdown"):
                return
            ex.finishing = True
        try:
            await self.store.finish(lease, status, output=output, error=error)
        except LeaseLost:
            self.metrics.leases_lost.inc()
            return
        self.metrics.runs_finished.labels(run["workflow"], status.value).inc()
        started = run.get("started_at") or time.time()
        self.metrics.run_duration.labels(run["workflow"]).observe(max(0.0, time.time() - started))
        log.info("run finished", extra={"run_id": lease.run_id, "status": status.value})

    async def _run_workflow(self, lease: Lease, run: dict[str, Any]) -> tuple[RunStatus, Any, dict[str, Any] | None]:
        defn = self.registry.get(run["workflow"])
        if defn is None:
            return RunStatus.FAILED, None, {"code": "unknown_workflow",
                                            "message": f"No workflow {run['workflow']!r} in this service."}
        if run["cancel_requested"]:
            return RunStatus.CANCELLED, None, {"code": "cancelled", "message": "Cancelled."}
        try:
            inp = defn.input_model.model_validate(run["input"])
        except ValidationError as exc:
            return RunStatus.FAILED, None, {"code": "invalid_input", "message": str(exc)}
        completed = await self.store.completed_steps(lease.run_id)
        ctx = RunContext(self.store, lease, run, completed, on_step=lambda st: self.metrics.steps.labels(st).inc(),
                         services=self.services)
        deadline = run.get("deadline_at")
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        try:
            async with asyncio.timeout(timeout) as cm:
                output = to_jsonable_python(await defn.fn(ctx, inp))
        except asyncio.CancelledError:
            ex = self._running.get(lease.run_id)
            if ex is not None and ex.stop_reason == "cancel":
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                return RunStatus.CANCELLED, None, {"code": "cancelled", "message": "Cancelled by request."}
            raise
        except TimeoutError:
            if cm.expired():
                return RunStatus.TIMED_OUT, None, {"code": "timeout",
                                                   "message": f"Run exceeded its timeout of {run['timeout_seconds']} s."}
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

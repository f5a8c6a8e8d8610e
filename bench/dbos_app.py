"""The rival service of ``bench/vs_dbos.py``: the benchmark's workflows on DBOS Transact, behind HTTP.

A minimal FastAPI app whose endpoints mirror the orchestrator's, so that one client drives both:

    POST /runs {"workflow": "steps"|"events", "input": {...}}  -> 201 {"id": ...}  (started, not finished)
    GET  /runs/{id}?wait=30                                   -> {"id", "status", "output"}
    GET  /readyz

Statuses are given in the orchestrator's words (``queued``, ``running``, ``succeeded``, ``failed``,
``cancelled``), so the harness reads both services the same way.

Configured only by environment, as the harness starts it as its own uvicorn process:

- ``DBOS_BENCH_DB_URL``: the system database (a fresh PostgreSQL database per process).
- ``DBOS_BENCH_FORM``: ``direct`` (``DBOS.start_workflow_async``: the workflow starts in this
  process at once, and the waiter awaits its task) or ``queue`` (a durable DBOS ``Queue`` with
  ``worker_concurrency`` like the orchestrator's worker; the waiter polls the system database).
- ``DBOS_BENCH_EXECUTE`` (1): 0 makes the queue form accept runs without dequeuing any.
- ``DBOS_BENCH_CONCURRENCY`` (16), ``DBOS_BENCH_QUEUE_POLL_S`` (0.01: how often the queue
  thread looks for work; DBOS's default is 1 s, which would make it look far slower than it is),
  ``DBOS_BENCH_RESULT_POLL_S`` (0.01: how often a queued run's waiter re-reads its status; DBOS's
  default is 1 s).

The workflows and steps are ``async``: DBOS 3.4 runs async workflows on the event loop and does
their database writes in threads (psycopg, synchronous), so no request waits behind a blocked loop.
"""

from __future__ import annotations

import asyncio
import os
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator
from typing import Any

from dbos import DBOS, DBOSConfig, WorkflowHandleAsync
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field

FORM = os.environ.get("DBOS_BENCH_FORM", "direct")
CONCURRENCY = int(os.environ.get("DBOS_BENCH_CONCURRENCY", "16"))
QUEUE_POLL_S = float(os.environ.get("DBOS_BENCH_QUEUE_POLL_S", "0.01"))
RESULT_POLL_S = float(os.environ.get("DBOS_BENCH_RESULT_POLL_S", "0.01"))
EXECUTE = os.environ.get("DBOS_BENCH_EXECUTE", "1") != "0"  # queue form: dequeue and run, or only accept
QUEUE_NAME = "bench"
STREAM_KEY = "events"
# DBOS status -> the orchestrator's status word
STATUS = {"SUCCESS": "succeeded", "ERROR": "failed", "CANCELLED": "cancelled", "PENDING": "running",
          "ENQUEUED": "queued", "DELAYED": "queued", "MAX_RECOVERY_ATTEMPTS_EXCEEDED": "failed"}


@DBOS.step()
async def noop(i: int) -> int:
    """A step that does no work and returns a small value (the orchestrator's ``_identity``)."""
    return i


@DBOS.workflow()
async def steps(n: int) -> dict[str, int]:
    """N checkpointed no-op steps (the orchestrator's ``steps`` workflow)."""
    for i in range(n):
        await noop(i)
    return {"steps": n}


@DBOS.workflow()
async def events(n: int) -> dict[str, int]:
    """N values written to the workflow's durable stream (the orchestrator's ``events``)."""
    for i in range(n):
        await DBOS.write_stream_async(STREAM_KEY, {"done": i + 1, "of": n})
    return {"events": n}


WORKFLOWS = {"steps": (steps, "steps"), "events": (events, "events")}


class NewRun(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workflow: str = Field(description="steps or events")
    input: dict[str, int] = Field(description='{"steps": n} or {"events": n}')


# Handles of runs started here, until their result has been read once; a waiter that finds none
# (a second read) asks the system database.
handles: dict[str, WorkflowHandleAsync[Any]] = {}


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    config: DBOSConfig = {"name": "bench", "system_database_url": os.environ["DBOS_BENCH_DB_URL"],
                          "log_level": "WARNING"}
    DBOS(config=config)
    if not EXECUTE:  # accept runs into the queue, execute none (the accept-only figures)
        DBOS.listen_queues(["no-such-queue"])
    await asyncio.to_thread(DBOS.launch)
    if FORM == "queue":  # queues live in the system database, so after launch
        await DBOS.register_queue_async(QUEUE_NAME, worker_concurrency=CONCURRENCY,
                                        polling_interval_sec=QUEUE_POLL_S)
        await asyncio.sleep(1.2)  # DBOS's queue manager looks for new queues once a second
    try:
        yield
    finally:
        DBOS.destroy(destroy_registry=False)


app = FastAPI(lifespan=lifespan)


@app.get("/readyz")
async def readyz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/runs", status_code=201)
async def submit(body: NewRun) -> dict[str, str]:
    """Start the run and return at once, as the orchestrator's POST /v1/runs does."""
    entry = WORKFLOWS.get(body.workflow)
    if entry is None or set(body.input) != {entry[1]}:
        raise HTTPException(422, f"unknown workflow or input: {body.workflow} {body.input}")
    fn, key = entry
    if FORM == "queue":
        handle = await DBOS.enqueue_workflow_async(QUEUE_NAME, fn, body.input[key])
    else:
        handle = await DBOS.start_workflow_async(fn, body.input[key])
    handles[handle.workflow_id] = handle
    return {"id": handle.workflow_id}


@app.get("/runs/{run_id}")
async def get_run(run_id: str, wait: float = 0) -> dict[str, Any]:
    """The run's status; with ``wait``, first wait up to that long for it to finish."""
    handle = handles.get(run_id)
    if wait > 0 and handle is not None:
        try:
            output = await asyncio.wait_for(handle.get_result(polling_interval_sec=RESULT_POLL_S), wait)
        except TimeoutError:
            pass
        except Exception as exc:  # the run failed: report it as the orchestrator would
            handles.pop(run_id, None)
            return {"id": run_id, "status": "failed", "output": None, "error": repr(exc)}
        else:
            handles.pop(run_id, None)
            return {"id": run_id, "status": "succeeded", "output": output}
    status = await DBOS.get_workflow_status_async(run_id)
    if status is None:
        raise HTTPException(404, f"no run {run_id}")
    return {"id": run_id, "status": STATUS.get(status.status, status.status.lower()), "output": status.output}

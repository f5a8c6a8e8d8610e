"""The asynchronous client: the same API as ``Client``, awaited."""

from __future__ import annotations

import asyncio
import builtins  # annotations after the method named `list`
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from orchestrator_sdk._base import (
    ClientConfig,
    SSEParser,
    StreamCursor,
    list_params,
    new_idempotency_key,
    retry_delay,
    BatchStreamCursor,
    batch_create_body,
    parse_jsonl,
    run_create_body,
    should_retry,
)
from orchestrator_sdk._errors import APIConnectionError, APITimeoutError, error_for
from orchestrator_sdk._models import Batch, BatchEvent, BatchResult, Page, Run, RunEvent, Step, Workflow


class AsyncClient:
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 2,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = ClientConfig.build(base_url, api_key, timeout, max_retries)
        self._http = httpx.AsyncClient(base_url=self.config.base_url, headers=self.config.headers,
                                       timeout=timeout, transport=transport)
        self.runs = AsyncRuns(self)
        self.workflows = AsyncWorkflows(self)
        self.batches = AsyncBatches(self)

    async def request(self, method: str, path: str, *, json: Any = None, params: Any = None,
                      headers: dict[str, str] | None = None,
                      timeout: float | None = None,  # noqa: ASYNC109 (httpx's per-request timeout)
                      raw: bool = False) -> Any:
        """See ``Client.request``."""
        attempt = 0
        while True:
            response: httpx.Response | None = None
            try:
                response = await self._http.request(method, path, json=json, params=params, headers=headers,
                                                    timeout=timeout if timeout is not None else self.config.timeout)
            except httpx.TimeoutException as exc:
                error: Exception = APITimeoutError(str(exc) or "request timed out")
            except httpx.TransportError as exc:
                error = APIConnectionError(str(exc) or type(exc).__name__)
            else:
                if response.status_code < 400:
                    return response.text if raw else response.json()
                error = error_for(response)
            if attempt >= self.config.max_retries or not should_retry(response):
                raise error
            await asyncio.sleep(retry_delay(attempt, response))
            attempt += 1

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncRuns:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(self, workflow: str, input: Any = None, *, metadata: dict[str, Any] | None = None,
                     priority: int = 0, timeout_seconds: float | None = None,
                     idempotency_key: str | None = None, queue: str | None = None) -> Run:
        key = idempotency_key or new_idempotency_key()
        body = run_create_body(workflow, input, metadata, priority, timeout_seconds, queue)
        return Run.model_validate(await self._c.request("POST", "/v1/runs", json=body,
                                                        headers={"Idempotency-Key": key}))

    async def get(self, run_id: str, *, wait: float | None = None) -> Run:
        params = {"wait": wait} if wait else None
        timeout = self._c.config.timeout + (wait or 0)
        return Run.model_validate(await self._c.request("GET", f"/v1/runs/{run_id}", params=params,
                                                        timeout=timeout))

    async def list(self, *, limit: int = 20, after: str | None = None, status: list[str] | str | None = None,
                   workflow: str | None = None) -> Page[Run]:
        data = await self._c.request("GET", "/v1/runs", params=list_params(limit, after, status, workflow))
        return Page[Run].model_validate(data)

    async def list_all(self, *, page_size: int = 100, status: builtins.list[str] | str | None = None,
                       workflow: str | None = None) -> AsyncIterator[Run]:
        after = None
        while True:
            page = await self.list(limit=page_size, after=after, status=status, workflow=workflow)
            for run in page.data:
                yield run
            if not page.has_more:
                return
            after = page.next_cursor

    async def cancel(self, run_id: str) -> Run:
        return Run.model_validate(await self._c.request("POST", f"/v1/runs/{run_id}/cancel"))

    async def resume(self, run_id: str) -> Run:
        """Queue a failed, cancelled or timed-out run again; its completed steps are replayed."""
        return Run.model_validate(await self._c.request("POST", f"/v1/runs/{run_id}/resume"))

    async def fork(self, run_id: str, *, from_step: int, idempotency_key: str | None = None) -> Run:
        """A new run from ``run_id``'s checkpoints of the steps before ``from_step`` (retried safely:
        one idempotency key serves every retry)."""
        headers = {"Idempotency-Key": idempotency_key or new_idempotency_key()}
        return Run.model_validate(await self._c.request("POST", f"/v1/runs/{run_id}/fork",
                                                      json={"from_step": from_step}, headers=headers))

    async def wait(self, run_id: str, *, timeout: float | None = None,  # noqa: ASYNC109 (the sync API's)
                   poll: float = 30.0) -> Run:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = poll if deadline is None else min(poll, deadline - time.monotonic())
            run = await self.get(run_id, wait=max(left, 0.0) or None)
            if run.finished or (deadline is not None and time.monotonic() >= deadline):
                return run

    async def steps(self, run_id: str) -> builtins.list[Step]:
        return Page[Step].model_validate(await self._c.request("GET", f"/v1/runs/{run_id}/steps")).data

    async def events(self, run_id: str, *, starting_after: int = 0, limit: int = 100) -> Page[RunEvent]:
        data = await self._c.request("GET", f"/v1/runs/{run_id}/events",
                                     params={"starting_after": starting_after, "limit": limit})
        return Page[RunEvent].model_validate(data)

    async def stream(self, run_id: str, *, starting_after: int = 0,
                     max_reconnects: int = 10) -> AsyncIterator[RunEvent]:
        """See ``Runs.stream``."""
        cursor = StreamCursor(run_id, starting_after, max_reconnects)
        timeout = httpx.Timeout(self._c.config.timeout, read=max(self._c.config.timeout, 60.0))
        while True:
            response: httpx.Response | None = None
            error: Exception | None = None
            try:
                async with self._c._http.stream("GET", f"/v1/runs/{run_id}/events", headers=cursor.headers(),
                                                timeout=timeout) as r:
                    if r.status_code >= 400:
                        await r.aread()
                        response, error = r, error_for(r)
                    else:
                        parser = SSEParser()
                        async for line in r.aiter_lines():
                            frame = parser.feed(line)
                            event = cursor.accept(frame[2]) if frame is not None else None
                            if event is None:
                                continue
                            yield event
                            if event.final:
                                return
            except httpx.TransportError as exc:
                error = APIConnectionError(str(exc) or type(exc).__name__)
            await asyncio.sleep(cursor.next_delay(error, response))


class AsyncWorkflows:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def list(self) -> list[Workflow]:
        return Page[Workflow].model_validate(await self._c.request("GET", "/v1/workflows")).data


class AsyncBatches:
    """``/v1/batches``: many runs of one workflow (RL rollouts: ``agent`` trajectories) as one."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(self, requests: builtins.list[Any], *, workflow: str = "agent",
               metadata: dict[str, Any] | None = None, return_tokens: bool = False, priority: int = 0,
               timeout_seconds: float | None = None, queue: str | None = None,
               idempotency_key: str | None = None) -> Batch:
        """One run per item of ``requests`` (each the workflow's input), all written or none. With
        ``return_tokens``, ``agent`` runs record token ids and logprobs for ``results``. One
        idempotency key serves every retry."""
        key = idempotency_key or new_idempotency_key()
        body = batch_create_body(requests, workflow, metadata, return_tokens, priority, timeout_seconds, queue)
        return Batch.model_validate(await self._c.request("POST", "/v1/batches", json=body,
                                                        headers={"Idempotency-Key": key}))

    async def get(self, batch_id: str) -> Batch:
        return Batch.model_validate(await self._c.request("GET", f"/v1/batches/{batch_id}"))

    async def list(self, *, limit: int = 20, after: str | None = None) -> Page[Batch]:
        params: dict[str, Any] = {"limit": limit}
        if after:
            params["after"] = after
        return Page[Batch].model_validate(await self._c.request("GET", "/v1/batches", params=params))

    async def cancel(self, batch_id: str) -> Batch:
        return Batch.model_validate(await self._c.request("POST", f"/v1/batches/{batch_id}/cancel"))

    async def results(self, batch_id: str) -> builtins.list[BatchResult]:
        """Every run of the batch in input order (finished or not: ``status`` says)."""
        text = await self._c.request("GET", f"/v1/batches/{batch_id}/results", raw=True)
        return [BatchResult.model_validate(x) for x in parse_jsonl(text)]

    async def wait(self, batch_id: str, *, timeout: float | None = None,  # noqa: ASYNC109 (the sync API's)
             poll: float = 1.0) -> Batch:
        """Poll until every run has finished (or ``timeout`` seconds pass: the batch as it is then)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = await self.get(batch_id)
            if batch.finished or (deadline is not None and time.monotonic() >= deadline):
                return batch
            await asyncio.sleep(poll)

    async def stream(self, batch_id: str, *, max_reconnects: int = 10) -> AsyncIterator[BatchEvent]:
        """A ``batch.run_finished`` event per run as it finishes, then ``batch.finished``; resumes
        by itself after a dropped connection (each completion delivered once)."""
        cursor = BatchStreamCursor(batch_id, max_reconnects)
        timeout = httpx.Timeout(self._c.config.timeout, read=max(self._c.config.timeout, 60.0))
        while True:
            response: httpx.Response | None = None
            error: Exception | None = None
            try:
                async with self._c._http.stream("GET", f"/v1/batches/{batch_id}/events",
                                                headers=cursor.headers(), timeout=timeout) as r:
                    if r.status_code >= 400:
                        await r.aread()
                        response, error = r, error_for(r)
                    else:
                        parser = SSEParser()
                        async for line in r.aiter_lines():
                            frame = parser.feed(line)
                            event = cursor.accept_frame(frame) if frame is not None else None
                            if event is None:
                                continue
                            yield event
                            if event.final:
                                return
            except httpx.TransportError as exc:
                error = APIConnectionError(str(exc) or type(exc).__name__)
            await asyncio.sleep(cursor.next_delay(error, response))

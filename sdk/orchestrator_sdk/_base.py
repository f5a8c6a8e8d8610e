"""What the sync and async clients share: configuration, retry policy, SSE parsing.

Retries follow openai-python: connection errors, 408, 429 and 5xx are retried
with exponential backoff (0.5 s doubling to 8 s, with jitter); a ``Retry-After``
header wins. 409 and other 4xx are never retried: they are answers.
"""

from __future__ import annotations

import os
import random
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from orchestrator_sdk._models import BatchEvent, RunEvent

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 8.0


@dataclass
class ClientConfig:
    base_url: str
    api_key: str | None
    timeout: float
    max_retries: int
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, base_url: str | None, api_key: str | None, timeout: float, max_retries: int) -> ClientConfig:
        url = (base_url or os.environ.get("ORCH_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("ORCH_API_KEY")
        headers = {"User-Agent": "orchestrator-python"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return cls(url, key, timeout, max_retries, headers)


def new_idempotency_key() -> str:
    return f"sdk-{uuid.uuid4()}"


def should_retry(response: httpx.Response | None) -> bool:
    return response is None or response.status_code in RETRY_STATUSES


def retry_delay(attempt: int, response: httpx.Response | None) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based)."""
    if response is not None:
        header = response.headers.get("retry-after")
        if header:
            try:
                return min(max(float(header), 0.0), 60.0)
            except ValueError:
                pass
    delay = min(INITIAL_BACKOFF * (2**attempt), MAX_BACKOFF)
    return delay * (1 - 0.25 * random.random())


def run_create_body(
    workflow: str, input: Any, metadata: dict[str, Any] | None, priority: int, timeout_seconds: float | None,
    queue: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"workflow": workflow, "input": input, "metadata": metadata or {}, "priority": priority}
    if timeout_seconds is not None:
        body["timeout_seconds"] = timeout_seconds
    if queue is not None:
        body["queue"] = queue
    return body


def list_params(limit: int, after: str | None, status: list[str] | str | None,
                workflow: str | None) -> list[tuple[str, Any]]:
    params: list[tuple[str, Any]] = [("limit", limit)]
    if after:
        params.append(("after", after))
    if isinstance(status, str):
        status = [status]
    params += [("status", s) for s in status or []]
    if workflow:
        params.append(("workflow", workflow))
    return params


class StreamCursor:
    """Where a resuming event stream stands: the last sequence number seen and the
    reconnects since the last event. Shared by the sync and async iterators."""

    def __init__(self, run_id: str, starting_after: int, max_reconnects: int) -> None:
        self.run_id = run_id
        self.last = starting_after
        self.failures = 0
        self.max_reconnects = max_reconnects

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        if self.last:
            headers["Last-Event-ID"] = str(self.last)
        return headers

    def accept(self, data: str) -> RunEvent | None:
        """The event in an SSE data field, or ``None`` when it was already delivered."""
        from orchestrator_sdk._models import RunEvent

        event = RunEvent.model_validate_json(data)
        if event.seq <= self.last:
            return None
        self.last, self.failures = event.seq, 0
        return event

    def next_delay(self, error: Exception | None, response: httpx.Response | None) -> float:
        """After a broken or refused connection: seconds to wait, or raise when it is final."""
        from orchestrator_sdk._errors import StreamError

        if response is not None and not should_retry(response):
            assert error is not None
            raise error
        self.failures += 1
        if self.failures > self.max_reconnects:
            raise StreamError(f"event stream of {self.run_id} lost after {self.max_reconnects} reconnects: {error}")
        return retry_delay(self.failures - 1, response)


class SSEParser:
    """Incremental Server-Sent Events parser: feed lines, get ``(id, event, data)`` per event."""

    def __init__(self) -> None:
        self._id: str | None = None
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str | None, str | None, str] | None:
        if line == "":
            if not self._data:
                self._event = None
                return None
            out = (self._id, self._event, "\n".join(self._data))
            self._event, self._data = None, []
            return out
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            self._id = value
        elif name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


def batch_create_body(requests: list[Any], workflow: str, metadata: dict[str, Any] | None, return_tokens: bool,
                      priority: int, timeout_seconds: float | None, queue: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"workflow": workflow, "requests": list(requests), "metadata": metadata or {},
                            "return_tokens": return_tokens, "priority": priority}
    if timeout_seconds is not None:
        body["timeout_seconds"] = timeout_seconds
    if queue is not None:
        body["queue"] = queue
    return body


def parse_jsonl(text: str) -> list[Any]:
    import json

    return [json.loads(line) for line in text.splitlines() if line.strip()]


class BatchStreamCursor(StreamCursor):
    """A batch's event stream: resumes with the last event id; the service may send a run's
    completion again after a resume (at least once), so completions seen are dropped here."""

    def __init__(self, batch_id: str, max_reconnects: int) -> None:
        super().__init__(batch_id, 0, max_reconnects)
        self.last_id: str | None = None
        self.seen: set[tuple[int, float]] = set()

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        if self.last_id:
            headers["Last-Event-ID"] = self.last_id
        return headers

    def accept_frame(self, frame: tuple[str | None, str | None, str]) -> BatchEvent | None:
        from orchestrator_sdk._models import BatchEvent

        event = BatchEvent.model_validate_json(frame[2])
        self.failures = 0
        if frame[0]:
            self.last_id = frame[0]
        if event.index is not None:
            key = (event.index, event.finished_at or 0.0)
            if key in self.seen:
                return None
            self.seen.add(key)
        return event

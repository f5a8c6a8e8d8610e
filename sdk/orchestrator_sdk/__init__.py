"""Python SDK of the orchestrator: ``Client`` and ``AsyncClient`` over httpx.

Typed models, a typed error hierarchy, retries with backoff that honour
``Retry-After``, an idempotency key per create reused across its retries, and
event streams that resume by themselves after a dropped connection.
"""

from orchestrator_sdk._async import AsyncClient
from orchestrator_sdk._errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    OrchestratorError,
    PayloadTooLargeError,
    RateLimitError,
    StreamError,
    UnprocessableEntityError,
)
from orchestrator_sdk._models import Batch, BatchCounts, BatchEvent, BatchResult, Page, Run, RunEvent, Step, Workflow
from orchestrator_sdk._sync import Client

__all__ = [
    "APIConnectionError", "APIStatusError", "APITimeoutError", "AsyncClient", "AuthenticationError",
    "Batch", "BatchCounts", "BatchEvent", "BatchResult",
    "BadRequestError", "Client", "ConflictError", "InternalServerError", "NotFoundError", "OrchestratorError",
    "Page", "PayloadTooLargeError", "RateLimitError", "Run", "RunEvent", "Step", "StreamError",
    "UnprocessableEntityError", "Workflow",
]

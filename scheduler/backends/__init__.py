"""LLM backends behind one interface (see ``base.py``)."""

from scheduler.backends.base import (
    Backend, BackendError, BackendHTTPError, BackendTimeout, BackendUnavailable, Capacity, GenerateRequest,
    Generation, GenerationChunk, Load, StreamInterrupted, TokenLogprob, ToolCall, ToolCallBuffer, Usage, new_rid,
)
from scheduler.backends.pool import BackendPool, BreakerState, CircuitBreaker, NoBackendAvailable

__all__ = [
    "BackendPool", "BreakerState", "CircuitBreaker", "NoBackendAvailable",
    "Backend", "BackendError", "BackendHTTPError", "BackendTimeout", "BackendUnavailable", "Capacity",
    "GenerateRequest", "Generation", "GenerationChunk", "Load", "StreamInterrupted", "TokenLogprob", "ToolCall",
    "ToolCallBuffer", "Usage", "new_rid",
]

"""LLM backends behind one interface (see ``base.py``). Failover between them is the runtime's
(``scheduler.runtime``): the scheduler core places each call on a healthy backend."""

from scheduler.backends.base import (
    Backend, BackendError, BackendHTTPError, BackendTimeout, BackendUnavailable, Capacity, GenerateRequest,
    Generation, GenerationChunk, Load, StreamInterrupted, TokenLogprob, ToolCall, ToolCallBuffer, Usage, new_rid,
)

__all__ = [
    "Backend", "BackendError", "BackendHTTPError", "BackendTimeout", "BackendUnavailable", "Capacity",
    "GenerateRequest", "Generation", "GenerationChunk", "Load", "StreamInterrupted", "TokenLogprob", "ToolCall",
    "ToolCallBuffer", "Usage", "new_rid",
]

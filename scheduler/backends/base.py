"""The one interface every LLM backend implements.

Every LLM call of the product (gateway turns, agent loops, evolve, pipelines)
goes through a ``Backend``: SGLang over its native HTTP API, any
OpenAI-compatible endpoint, the local CPU engine, or the simulator. The
scheduler needs more than text from it: the request id (to abort), cached
prompt tokens (to see whether KV was kept), logprobs (evolve's confidence
fitness), capacity and live load (to place and pause programs).
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FinishReason = Literal["stop", "length", "tool_calls", "abort", "error"]


def new_rid() -> str:
    return f"req-{uuid.uuid4().hex}"


class GenerateRequest(BaseModel):
    """One generation. Exactly one of ``messages`` (chat), ``prompt`` (raw text) or
    ``input_ids`` (raw tokens) is set."""

    model_config = ConfigDict(extra="forbid")

    rid: str = Field(default_factory=new_rid, description="Request id; abort uses it.")
    model: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    input_ids: list[int] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: list[str] | None = None
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=20)
    prompt_logprobs: bool = False
    prompt_top_logprobs: int = Field(default=0, ge=0, le=20)
    priority: int | None = None
    stream: bool = Field(default=True, description=(
        "False: the caller reads only the whole answer, so a backend may fetch it in one response "
        "(one read instead of an SSE event per token on the gateway's non-streamed path)."))
    extra_body: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        given = [x is not None for x in (self.messages, self.prompt, self.input_ids)]
        if sum(given) != 1:
            raise ValueError("set exactly one of messages, prompt or input_ids")
        return self


class TokenLogprob(BaseModel):
    token: str
    token_id: int | None = None
    logprob: float
    top: list[tuple[str, float]] = Field(default_factory=list, description="(token, logprob), best first")


class ToolCall(BaseModel):
    id: str
    name: str
    arguments: str = Field(description="JSON text, as the model wrote it")


class ToolCallBuffer:
    """Assembles streamed OpenAI-format tool-call deltas (by ``index``) into ``ToolCall``s."""

    def __init__(self) -> None:
        self._slots: dict[int, dict[str, str]] = {}

    def add(self, index: int, id: str | None, name: str | None, arguments: str | None) -> None:
        slot = self._slots.setdefault(index, {"id": "", "name": "", "arguments": ""})
        slot["id"] = id or slot["id"]
        slot["name"] += name or ""
        slot["arguments"] += arguments or ""

    def calls(self) -> list[ToolCall]:
        return [ToolCall(id=c["id"] or f"call_{i}", name=c["name"], arguments=c["arguments"])
                for i, c in sorted(self._slots.items())]

    def finish_reason(self, finish: FinishReason | None) -> FinishReason:
        """A turn that produced tool calls and stopped normally finished *for* the tool calls."""
        return "tool_calls" if self._slots and finish in (None, "stop") else (finish or "stop")


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = Field(default=0, description="Prompt tokens served from the prefix cache")


class GenerationChunk(BaseModel):
    """A streamed piece: ``text`` and ``logprobs`` are deltas. The last chunk has
    ``finish_reason``, ``usage`` and, when asked, ``prompt_logprobs``."""

    rid: str
    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[TokenLogprob] = Field(default_factory=list)
    tool_calls: list[ToolCall] = Field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


class Generation(BaseModel):
    rid: str
    text: str
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[TokenLogprob] = Field(default_factory=list)
    tool_calls: list[ToolCall] = Field(default_factory=list)
    finish_reason: FinishReason
    usage: Usage
    prompt_logprobs: list[TokenLogprob] | None = None

    @classmethod
    def from_chunks(cls, rid: str, chunks: list[GenerationChunk]) -> Generation:
        last = chunks[-1] if chunks else GenerationChunk(rid=rid, finish_reason="error")
        return cls(
            rid=rid,
            text="".join(c.text for c in chunks),
            token_ids=[t for c in chunks for t in c.token_ids],
            logprobs=[lp for c in chunks for lp in c.logprobs],
            tool_calls=[tc for c in chunks for tc in c.tool_calls],
            finish_reason=last.finish_reason or "error",
            usage=last.usage or Usage(),
            prompt_logprobs=last.prompt_logprobs,
        )


class Capacity(BaseModel):
    max_total_tokens: int = Field(description="KV cache size in tokens")
    max_context_tokens: int | None = None
    ranks_kv: bool = Field(default=False, description=(
        "Evicts cached KV by request priority, lowest first (SGLang's --radix-eviction-policy priority), "
        "with no queue ordering that a rank would disturb: the program policy's Retain lever"))


class Load(BaseModel):
    running: int = 0
    queued: int = 0
    used_tokens: int = 0
    total_tokens: int | None = None


class BackendError(Exception):
    """Base of backend failures. ``retryable`` says whether the same request may be sent
    again (to this or another backend) without the caller seeing a duplicate."""

    retryable = False

    def __init__(self, message: str, *, backend: str | None = None) -> None:
        super().__init__(message)
        self.backend = backend


class BackendUnavailable(BackendError):
    """Could not connect, or the backend reports itself unhealthy."""

    retryable = True


class BackendTimeout(BackendError):
    retryable = True


class BackendHTTPError(BackendError):
    def __init__(self, message: str, *, status: int, backend: str | None = None) -> None:
        super().__init__(message, backend=backend)
        self.status = status
        self.retryable = status >= 500 or status == 429


class StreamInterrupted(BackendError):
    """The stream broke after some output was produced: not retried blindly."""


class Backend(abc.ABC):
    """Async LLM backend. ``stream`` is the primitive; ``generate`` collects it."""

    name: str = "backend"
    # Renders a chat whose last message is an assistant turn left open when the request's
    # ``extra_body`` says ``continue_final_message`` (SGLang, vLLM, the local engine): the
    # staircase's ``prefix`` continuation relies on it. An arbitrary OpenAI-compatible
    # endpoint may refuse the parameter or ignore it.
    continues_final_message: bool = False

    @abc.abstractmethod
    def stream(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]: ...

    async def generate(self, request: GenerateRequest) -> Generation:
        chunks = [chunk async for chunk in self.stream(request)]
        return Generation.from_chunks(request.rid, chunks)

    @abc.abstractmethod
    async def abort(self, rid: str) -> None: ...

    @abc.abstractmethod
    async def capacity(self) -> Capacity: ...

    @abc.abstractmethod
    async def load(self) -> Load: ...

    @abc.abstractmethod
    async def health(self) -> bool: ...

    async def close(self) -> None:
        return None

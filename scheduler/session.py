"""One program's life in the runtime, as the workflows see it: the program protocol.

A workflow (an agent run, a pipeline's agent, an evolve problem on one model) opens a
``ProgramSession`` for each program it runs and does everything through it:

    async with ProgramSession(runtime, program_id, tenant, sandbox=True) as session:
        gen = await session.generate(request)
        session.tool_started("python"); ...; session.tool_ended()

- **Claim and release.** Opening claims the id for the tenant (``ProgramInUse`` if another
  tenant's); leaving releases it, however the block ends (answer, exception, cancel), so no
  workflow carries its own release-and-ignore code.
- **The sandbox, declared once.** ``sandbox=True`` says the program runs tools: only then does the
  runtime act on the core's ``PrepareSandbox`` / ``CollectSandbox`` for it. Programs that run no
  tools (pipelines, evolve, gateway calls) never cost a sandbox, which with Kubernetes
  sandboxes is a pod.
- **One retry policy.** The runtime already places a call that failed before any output on
  another healthy backend (failover); when none is left, ``RetryPolicy`` sends the same call
  again after a backoff, while nothing of it has been seen. The only retry loop of the service's
  LLM calls is here.
- **Its own exceptions.** ``CallFailed`` (with ``retryable`` and the backend's HTTP ``status``)
  and ``ProgramInUse``: workflows catch these, never the scheduler core's or a backend's.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from dataclasses import dataclass
from types import TracebackType
from collections.abc import AsyncGenerator

from scheduler.backends.base import BackendError, BackendHTTPError, GenerateRequest, Generation, GenerationChunk
from scheduler.core import UnknownProgram
from scheduler.runtime import ProgramConflict, ProgramRuntime

log = logging.getLogger("scheduler.session")


class SessionError(Exception):
    """Base of what a program session raises."""


class ProgramInUse(SessionError):
    """The program id is claimed by another tenant."""


class CallFailed(SessionError):
    """An LLM call of the program failed, after the retry policy: ``retryable`` says whether the
    failure was the backends' (worth a later try) rather than the request's; ``status`` is the
    backend's HTTP status where it answered one. The message names the cause's type first."""

    def __init__(self, message: str, *, retryable: bool = False, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status

    @classmethod
    def of(cls, exc: BackendError) -> CallFailed:
        return cls(f"{type(exc).__name__}: {exc}", retryable=exc.retryable,
                   status=exc.status if isinstance(exc, BackendHTTPError) else None)


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and after how long, a call that failed retryably before any output is sent again
    (after the runtime found no other backend for it): ``base_delay_s`` doubling per retry."""

    retries: int = 2
    base_delay_s: float = 0.5

    def delay(self, retry: int) -> float:
        return self.base_delay_s * 2 ** retry


DEFAULT_RETRY = RetryPolicy()


class ProgramSession:
    """One program, claimed on entry and released on exit; see the module docstring."""

    def __init__(self, runtime: ProgramRuntime, program_id: str, tenant: str, *, sandbox: bool = False,
                 backends: tuple[str, ...] | None = None, prefix_key: str | None = None, prefix_tokens: int = 0,
                 retry: RetryPolicy = DEFAULT_RETRY) -> None:
        self.runtime = runtime
        self.program_id = program_id
        self.tenant = tenant
        self.sandbox = sandbox
        self.backends = backends
        self.prefix_key = prefix_key
        self.prefix_tokens = prefix_tokens
        self.retry = retry

    async def __aenter__(self) -> ProgramSession:
        try:
            self.runtime.claim(self.program_id, self.tenant, sandbox=self.sandbox)
        except ProgramConflict:
            raise ProgramInUse(f"program {self.program_id!r} belongs to another tenant") from None
        return self

    async def __aexit__(self, _type: type[BaseException] | None, _exc: BaseException | None,
                        _tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Release the program (idempotent: a program released already, or whose calls never
        reached the core, is simply forgotten)."""
        try:
            self.runtime.release(self.program_id, self.tenant)
        except UnknownProgram:
            pass

    # ---- calls -------------------------------------------------------------------------------

    async def stream(self, request: GenerateRequest, *,
                     backends: tuple[str, ...] | None = None) -> AsyncGenerator[GenerationChunk, None]:
        """One LLM call, streamed. Retried by the policy (as ``<rid>-r<n>``) while it failed
        retryably before its first chunk; after output, a failure is the caller's to judge.
        ``backends`` narrows the session's for this call. Closing the iterator early aborts the
        call on its engine."""
        only = backends or self.backends
        for retry in range(self.retry.retries + 1):
            attempt = request if not retry else request.model_copy(update={"rid": f"{request.rid}-r{retry}"})
            seen = False
            try:
                async with aclosing(self.runtime.stream(self.program_id, self.tenant, attempt,
                                                        prefix_key=self.prefix_key,
                                                        prefix_tokens=self.prefix_tokens, backends=only)) as calls:
                    async for chunk in calls:
                        seen = True
                        yield chunk
                return
            except BackendError as exc:
                if seen or not exc.retryable or retry == self.retry.retries:
                    raise CallFailed.of(exc) from exc
                log.warning("call %s of %s failed before any output (%s); again in %.1f s", attempt.rid,
                            self.program_id, exc, self.retry.delay(retry))
            await asyncio.sleep(self.retry.delay(retry))

    async def generate(self, request: GenerateRequest, *, backends: tuple[str, ...] | None = None) -> Generation:
        """One LLM call, whole. A call the engine ended with ``abort`` or ``error`` is a
        ``CallFailed`` too: it has no answer to give."""
        chunks = [c async for c in self.stream(request, backends=backends)]
        gen = Generation.from_chunks(request.rid, chunks)
        if gen.finish_reason in ("abort", "error"):
            raise CallFailed(f"the call {request.rid} of {self.program_id} ended with {gen.finish_reason}")
        return gen

    # ---- tool hints --------------------------------------------------------------------------

    def tool_started(self, tool: str) -> None:
        """The program runs a tool: its acting phase, for the scheduler. A program none of whose
        calls reached the core yet (a replayed run's first tool step) has no phase to change."""
        try:
            self.runtime.tool_started(self.program_id, self.tenant, tool)
        except UnknownProgram:
            pass

    def tool_ended(self) -> None:
        try:
            self.runtime.tool_ended(self.program_id, self.tenant)
        except UnknownProgram:
            pass

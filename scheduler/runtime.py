"""The real-time driver: the scheduler core's decisions carried out on real backends.

``ProgramRuntime`` is what the gateway calls, and the workflows through a
``scheduler.session.ProgramSession`` (claim, calls, tool hints, release, retries). A call becomes a
``RequestArrived``; the core answers with a ``Dispatch`` (now, or later when the program
is resumed: until then the call simply waits, which is how a program is paused on an
engine that has no pause API); the chosen backend streams; usage and whether the answer
called a tool go back as ``RequestFinished``. A backend that fails a call while another can
serve is marked down in the core (its programs are placed again elsewhere) and, if the caller
has seen no output yet, the call is placed again on a healthy backend (the only backend is
never marked down by one failed call: the session's retry policy tries again, the observation
judges it); the periodic observation (capacity and live load: the health check) brings a
backend back when it answers. That is the service's one failover mechanism: a call refused
because no backend is healthy raises ``NoBackendAvailable`` at once. On a backend that evicts cached
KV by priority (``Capacity.ranks_kv``) each call carries its rank as its ``priority`` (wall-clock
seconds, so that every service replica ranks alike), and a ``Retain`` is a one-token call over
the program's last call and its output with the rank as priority.
Backends are observed periodically (capacity and live load) and the policy gets its ticks. Everything runs on one event
loop, so the core needs no locks.
"""

from __future__ import annotations

import asyncio
from collections import Counter
import json
import logging
import time
from dataclasses import dataclass, field
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from typing import Any

from scheduler.backends.base import (
    Backend, BackendError, BackendUnavailable, GenerateRequest, GenerationChunk, StreamInterrupted, new_rid,
)
from scheduler.core import (
    BackendObserved, BackendView, CollectSandbox, Decision, Dispatch, PrepareSandbox, ProgramReleased,
    RequestArrived, RequestFinished, Retain, Scheduler, Tick, ToolEnded, ToolStarted, UnknownProgram,
)

log = logging.getLogger("scheduler.runtime")

SandboxHook = Callable[[str], Coroutine[object, object, None]]


class ProgramConflict(Exception):
    """The program id belongs to another tenant."""


class NoBackendAvailable(BackendUnavailable):
    """Every backend (every allowed one) failed its last check or was marked down: the call is
    refused at once rather than sent where it would fail. Retryable: the next observation may
    bring one back."""


def estimate_tokens(request: GenerateRequest) -> int:
    """Before usage arrives: about 4 characters a token (corrected by usage afterwards)."""
    if request.input_ids is not None:
        return len(request.input_ids)
    text = request.prompt if request.prompt is not None else json.dumps(request.messages, ensure_ascii=False)
    return max(1, len(text) // 4)


@dataclass
class RuntimeStats:
    backend_failures: dict[str, int] = field(default_factory=dict)  # backend -> calls it failed
    calls_placed_again: int = 0  # failed before any output, then placed on another backend
    retains_sent: int = 0  # one-token Retain calls that reached a backend
    retains_failed: int = 0
    idle_released: int = 0  # programs released for having nothing in flight for ``idle_release_s``
    decisions: int = 0
    decision_seconds: list[float] = field(default_factory=list)
    held_seconds: list[float] = field(default_factory=list)


class ProgramRuntime:
    def __init__(
        self,
        backends: dict[str, Backend],
        *,
        policy: str = "program",
        policy_options: dict[str, Any] | None = None,
        observe_interval_s: float = 2.0,
        prefill_s_per_token: float = 4e-5,
        on_prepare_sandbox: SandboxHook | None = None,
        on_collect_sandbox: SandboxHook | None = None,
        idle_release_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not backends:
            raise ValueError("a runtime needs at least one backend")
        self.backends = backends
        self.sched = Scheduler(policy, backends=[
            BackendView(name, 0, prefill_s_per_token=prefill_s_per_token) for name in backends],
            **(policy_options or {}))
        self.observe_interval_s = observe_interval_s
        self.clock = clock
        self.owners: dict[str, str] = {}  # program id -> tenant
        self._waiters: dict[str, asyncio.Future[Dispatch]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._hooks = {PrepareSandbox: on_prepare_sandbox, CollectSandbox: on_collect_sandbox}
        self.stats = RuntimeStats()
        self.token_totals = {"prompt": 0, "cached": 0}
        # programs that declared a sandbox when claimed: only theirs are prepared and collected
        self._sandboxed: set[str] = set()
        # program -> what a Retain resends (its last call, see _remember), on backends that rank KV;
        # held from the end of a call to the program's next call or its release
        self._last_context: dict[str, GenerateRequest] = {}
        self._wall_offset = time.time() - clock()  # core times -> wall-clock seconds for ranks
        self._side_tasks: set[asyncio.Task[None]] = set()
        # An agent behind the gateway may never call release (most OpenAI clients know nothing of
        # it) or may die mid-tool: its program would hold a place in the table and count as
        # acting for good. Programs claimed with ``idle_release=True`` are released
        # after ``idle_release_s`` with nothing in flight. Program id -> when it was last active.
        self.idle_release_s = idle_release_s if idle_release_s and idle_release_s > 0 else None
        self._last_active: dict[str, float] = {}
        self._open_calls: Counter[str] = Counter()  # program id -> its stream() calls not yet closed
        self._context_tokens: dict[str, int] = {}  # backend -> the context length it reports, if any

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.observe()
        self._tasks = [asyncio.create_task(self._loop(self.observe, self.observe_interval_s), name="observe"),
                       asyncio.create_task(self._loop(self._tick, self.sched.policy.tick_s), name="tick")]
        if self.idle_release_s is not None:
            every = max(0.05, min(60.0, self.idle_release_s / 10))
            self._tasks.append(asyncio.create_task(self._loop(self._release_idle, every), name="idle-release"))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        self._tasks = []
        for t in list(self._side_tasks):
            t.cancel()
        for fut in self._waiters.values():
            if not fut.done():
                fut.cancel()

    async def _loop(self, fn: Callable[[], Awaitable[None]], every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await fn()
            except Exception:
                log.exception("runtime loop %s failed", getattr(fn, "__name__", fn))

    async def _tick(self) -> None:
        self._handle(Tick(self.clock()))

    async def _release_idle(self) -> None:
        """Release the programs claimed for idle release that have had no call open (from its
        ``stream()`` to the caller closing it) and no tool hint for ``idle_release_s``. A later
        call with the same id starts afresh."""
        assert self.idle_release_s is not None
        now = self.clock()
        for pid, at in list(self._last_active.items()):
            if now - at < self.idle_release_s or self._open_calls[pid]:
                continue
            if pid not in self.sched.programs:  # claimed, but its call never reached the core
                del self._last_active[pid]
                self.owners.pop(pid, None)
                self._sandboxed.discard(pid)
                continue
            owner = self.owners[pid]  # claimed programs have one until released
            try:
                log.info("releasing program %s of %s: idle for %.0f s", pid, owner, now - at)
                self.release(pid, owner)
                self.stats.idle_released += 1
            except Exception:  # one program's failure must not keep the others
                log.exception("idle release of %s failed", pid)

    def _active(self, program_id: str) -> None:
        if program_id in self._last_active:
            self._last_active[program_id] = self.clock()

    async def observe(self) -> None:
        """Capacity (``/get_server_info``) and live load (``/v1/loads``) of every backend."""
        async def one(name: str, b: Backend) -> BackendObserved:
            try:
                cap, load = await asyncio.gather(b.capacity(), b.load())
                if cap.max_context_tokens:
                    self._context_tokens[name] = cap.max_context_tokens
                return BackendObserved(self.clock(), name, cap.max_total_tokens, load.used_tokens, load.running,
                                       load.queued, True, ranks_kv=cap.ranks_kv)
            except (TimeoutError, BackendError, OSError) as exc:
                log.warning("backend %s not observable: %s", name, exc)
                view = self.sched.backends[name]
                return BackendObserved(self.clock(), name, view.capacity, view.used, 0, 0, False)

        for ev in await asyncio.gather(*(one(n, b) for n, b in self.backends.items())):
            self._handle(ev)

    def max_context_tokens(self) -> int | None:
        """The smallest context length the backends report (``None``: none reports one). A call
        may be dispatched to any of them, so the tokens it asks for must fit the smallest."""
        return min(self._context_tokens.values(), default=None)

    # ---- decisions ---------------------------------------------------------------------------

    def _handle(self, event: object) -> None:
        t0 = time.perf_counter()
        decisions = self.sched.handle(event)  # type: ignore[arg-type]
        dt = time.perf_counter() - t0
        self.stats.decisions += 1
        self.stats.decision_seconds.append(dt)
        if len(self.stats.decision_seconds) > 10_000:
            del self.stats.decision_seconds[:5_000]
        for d in decisions:
            self._apply(d)

    def _apply(self, d: Decision) -> None:
        if isinstance(d, Dispatch):
            fut = self._waiters.pop(d.rid, None)
            if fut is not None and not fut.done():
                fut.set_result(d)
            return
        if isinstance(d, Retain):
            context = self._last_context.get(d.program_id)
            if context is not None:
                self._background(self._retain(d, context))
            return
        hook = self._hooks.get(type(d))
        if hook is not None and getattr(d, "program_id", None) in self._sandboxed:
            self._background(hook(d.program_id))
        # Pause / Resume are bookkeeping; Pin / Unpin have no lever on SGLang.

    def _background(self, coro: Coroutine[object, object, None]) -> None:
        """Run a side effect (a sandbox hook, a Retain) without waiting; the loop keeps only a
        weak reference to a task, so it is held here until done."""
        task = asyncio.get_running_loop().create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    # ---- the calls ---------------------------------------------------------------------------

    def claim(self, program_id: str, tenant: str, *, idle_release: bool = False, sandbox: bool = False) -> None:
        """``program_id`` is ``tenant``'s (``ProgramConflict`` if another tenant's). With
        ``idle_release`` (the gateway's programs, whose agents may never release them) it is
        released after ``idle_release_s`` with nothing in flight, where the runtime has one.
        With ``sandbox`` the program runs tools: the core's sandbox decisions are carried out
        for it (declared once, for the program's life; ``scheduler.session`` does it)."""
        owner = self.owners.get(program_id)
        if owner is not None and owner != tenant:
            raise ProgramConflict(program_id)
        self.owners[program_id] = tenant
        if sandbox:
            self._sandboxed.add(program_id)
        if idle_release and self.idle_release_s is not None:
            self._last_active[program_id] = self.clock()

    async def stream(self, program_id: str, tenant: str, request: GenerateRequest, *,
                     prefix_key: str | None = None, prefix_tokens: int = 0,
                     backends: tuple[str, ...] | None = None) -> AsyncGenerator[GenerationChunk, None]:
        """One LLM call of a program: waits while the program is paused, then streams.
        ``backends`` restricts where it may run (a model or backend the caller chose). Workflows
        call it through ``scheduler.session.ProgramSession``, which adds the retry policy."""
        unknown = [n for n in backends or () if n not in self.backends]
        if unknown:
            raise ValueError(f"unknown backends {unknown}; configured: {sorted(self.backends)}")
        self.claim(program_id, tenant)
        self._open_calls[program_id] += 1  # open until the caller closes it (see _release_idle)
        try:
            self._last_context.pop(program_id, None)  # held only while its tool runs
            if not self._available(backends):
                raise NoBackendAvailable("no healthy backend: every one " + ("allowed " if backends else "")
                                         + "failed its last check", backend="runtime")
            loop = asyncio.get_running_loop()
            failed: list[str] = []  # backends that failed this call before any output
            while True:
                fut: asyncio.Future[Dispatch] = loop.create_future()
                self._waiters[request.rid] = fut
                arrived = self.clock()
                self._handle(RequestArrived(arrived, program_id, request.rid, estimate_tokens(request), tenant,
                                            request.max_tokens, prefix_key, prefix_tokens, backends or None))
                yielded = False
                attempt = self._run(fut, arrived, request)
                try:
                    async for chunk in attempt:
                        yielded = True
                        yield chunk
                    return
                except BackendError as exc:
                    if not (exc.retryable or isinstance(exc, StreamInterrupted)):
                        raise  # the request's fault (4xx), not the backend's
                    if not fut.done() or fut.cancelled():
                        raise  # it failed before any backend was chosen
                    name = fut.result().backend
                    failed.append(name)
                    self.stats.backend_failures[name] = self.stats.backend_failures.get(name, 0) + 1
                    if not self._available(backends, excluding=failed):
                        # nowhere else to go: marking the only backend down would refuse every call
                        # until the next observation, even after a transient failure; the caller's
                        # retry (or the next observation, if it is really dead) decides
                        raise
                    self._mark_down(name)
                    if yielded or not exc.retryable:
                        raise
                    self.stats.calls_placed_again += 1
                    log.warning("call %s of %s failed on %s before any output (%s); placing it again",
                                request.rid, program_id, failed[-1], exc)
                finally:
                    await attempt.aclose()  # at once, not when collected: aborts the engine's request
        finally:
            self._open_calls[program_id] -= 1
            if self._open_calls[program_id] <= 0:
                del self._open_calls[program_id]
            self._active(program_id)

    def _available(self, allowed: tuple[str, ...] | None, excluding: list[str] | tuple[str, ...] = ()) -> bool:
        """Is a healthy backend with capacity there (among ``allowed``, other than ``excluding``)?"""
        return any(b.healthy and b.capacity > 0 and b.name not in excluding and (not allowed or b.name in allowed)
                   for b in self.sched.backends.values())

    def _mark_down(self, name: str) -> None:
        """A call failed on ``name`` and another backend can serve: mark it down in the core, so
        its programs are placed again elsewhere (the next observation brings it back when it
        answers)."""
        view = self.sched.backends[name]
        if view.healthy:
            self._handle(BackendObserved(self.clock(), name, view.capacity, view.used, 0, 0, False))

    async def _run(self, fut: asyncio.Future[Dispatch], arrived: float,
                   request: GenerateRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Wait for the core's dispatch, then stream from the chosen backend."""
        finished = False
        try:
            try:
                dispatch = await fut
            finally:
                self._waiters.pop(request.rid, None)
            self.stats.held_seconds.append(self.clock() - arrived)
            if len(self.stats.held_seconds) > 10_000:
                del self.stats.held_seconds[:5_000]
            backend = self.backends[dispatch.backend]
            if dispatch.priority is not None:
                request = request.model_copy(update={"priority": dispatch.priority})
            elif dispatch.retain_until is not None:
                request = request.model_copy(update={"priority": self._rank(dispatch.retain_until)})
            text: list[str] = []
            ids: list[int] = []
            async for chunk in backend.stream(request):
                if dispatch.retain_until is not None:
                    text.append(chunk.text)
                    ids.extend(chunk.token_ids)
                if chunk.finish_reason is not None:
                    usage = chunk.usage
                    tool = chunk.tool_calls[0].name if chunk.tool_calls else None
                    finished = True
                    if dispatch.retain_until is not None and chunk.finish_reason != "abort":
                        # every finished call: a tool phase may also start from a hint
                        self._remember(dispatch.program_id, request, "".join(text), ids)
                    if usage is not None:
                        self.token_totals["prompt"] += usage.prompt_tokens
                        self.token_totals["cached"] += usage.cached_tokens
                    self._handle(RequestFinished(self.clock(), request.rid,
                                                 usage.prompt_tokens if usage else estimate_tokens(request),
                                                 usage.completion_tokens if usage else 0,
                                                 usage.cached_tokens if usage else 0, tool=tool,
                                                 aborted=chunk.finish_reason == "abort"))
                yield chunk
        finally:
            if not finished:
                # cancelled, failed, or the caller stopped reading: free the engine and the table
                if fut.done() and not fut.cancelled():
                    try:
                        await asyncio.shield(self.backends[fut.result().backend].abort(request.rid))
                    except Exception:
                        pass
                self._handle(RequestFinished(self.clock(), request.rid, estimate_tokens(request), 0, 0,
                                             aborted=True))

    # ---- Retain: eviction ranks on SGLang ------------------------------------------------------

    def _rank(self, at: float) -> int:
        """A core time as the integer wall-clock second SGLang compares ranks in."""
        return int(at + self._wall_offset)

    def _remember(self, program_id: str, request: GenerateRequest, text: str, ids: list[int]) -> None:
        """What a Retain resends after this call: a one-token request over the KV it left.
        A raw prompt or token ids: those plus the output. A chat call: its messages plus its
        answer's text as a final assistant message continued (SGLang's
        ``continue_final_message``: the rendered prompt with its generation header, then the
        text's tokens, which is what the call left cached). Without that flag 0.5.23 turns a
        trailing assistant message into a user one. Tool calls are not resent: the tokens the
        model wrote for them cannot be rebuilt from the parsed calls, so they keep the call's
        own rank."""
        update: dict[str, object] = {"max_tokens": 1, "logprobs": False, "top_logprobs": 0,
                                     "prompt_logprobs": False, "prompt_top_logprobs": 0, "priority": None}
        if request.prompt is not None:
            update["prompt"] = request.prompt + text
        elif request.input_ids is not None:
            update["input_ids"] = [*request.input_ids, *ids]
        elif text and request.messages is not None:
            update["messages"] = [*request.messages, {"role": "assistant", "content": text}]
            update["extra_body"] = {**request.extra_body, "continue_final_message": True}
        self._last_context[program_id] = request.model_copy(update=update)

    async def _retain(self, d: Retain, context: GenerateRequest) -> None:
        """Send the one-token call that raises the program's cached path to its rank. Not a
        program call: the core never sees it; a failure costs only the rank."""
        backend = self.backends.get(d.backend)
        if backend is None:
            return
        request = context.model_copy(update={"rid": new_rid(), "priority": self._rank(d.until)})
        try:
            await backend.generate(request)
            self.stats.retains_sent += 1
        except Exception as exc:  # best effort: a backend error, or the runtime closing under it
            self.stats.retains_failed += 1
            log.debug("retain of %s on %s failed: %s", d.program_id, d.backend, exc)

    def release(self, program_id: str, tenant: str) -> None:
        if self.owners.get(program_id) != tenant:
            raise UnknownProgram(program_id)
        self.owners.pop(program_id, None)
        self._last_context.pop(program_id, None)
        self._last_active.pop(program_id, None)
        try:
            self._handle(ProgramReleased(self.clock(), program_id))
        except UnknownProgram:
            pass  # known to us, finished in the core: releasing twice is harmless
        finally:
            self._sandboxed.discard(program_id)

    def tool_started(self, program_id: str, tenant: str, tool: str) -> None:
        self._own(program_id, tenant)
        self._active(program_id)
        self._handle(ToolStarted(self.clock(), program_id, tool))

    def tool_ended(self, program_id: str, tenant: str) -> None:
        self._own(program_id, tenant)
        self._active(program_id)
        self._handle(ToolEnded(self.clock(), program_id))

    def _own(self, program_id: str, tenant: str) -> None:
        if self.owners.get(program_id) != tenant or program_id not in self.sched.programs:
            raise UnknownProgram(program_id)

    def programs(self, tenant: str) -> list[dict[str, object]]:
        return [p.snapshot() for pid, p in self.sched.programs.items() if self.owners.get(pid) == tenant]

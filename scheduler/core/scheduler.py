"""The sans-I/O scheduler: events in, decisions out.

``Scheduler.handle(event)`` updates the program table and the backend view, lets the
policy act, and returns the decisions for a driver to carry out. The mechanics that
every policy shares live here (who is in flight where, what a program's context is,
how long each tool took); the choices live in the policy.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from scheduler.core.decisions import (
    CollectSandbox, Decision, Dispatch, Pause, Pin, PrepareSandbox, Resume, Retain, Unpin,
)
from scheduler.core.events import (
    BackendObserved, Event, ProgramReleased, RequestArrived, RequestFinished, Tick, ToolEnded, ToolStarted,
)
from scheduler.core.policies.base import Policy, make_policy
from scheduler.core.state import BackendView, PendingRequest, Phase, Program, Status
from scheduler.core.tool_stats import ToolStats


class UnknownProgram(KeyError):
    pass


class Scheduler:
    def __init__(self, policy: Policy | str = "program", backends: Iterable[BackendView] = (),
                 **policy_options: object) -> None:
        self.policy = make_policy(policy, **policy_options) if isinstance(policy, str) else policy
        self.programs: dict[str, Program] = {}
        self.backends: dict[str, BackendView] = {b.name: b for b in backends}
        self.tools = ToolStats()
        # indexes kept in step with status and placement, so policies never scan every program
        self.resident: dict[str, dict[str, Program]] = {name: {} for name in self.backends}
        self.waiting: dict[str, Program] = {}
        # programs that changed since a policy's indexes last looked (None: no policy keeps any)
        self.touched_programs: set[str] | None = None
        self._rid_program: dict[str, str] = {}
        self._rid_backend: dict[str, str] = {}
        self._out: list[Decision] = []
        self.now = 0.0
        self.counters = {"dispatches": 0, "pauses": 0, "resumes": 0, "pins": 0, "unpins": 0, "retains": 0,
                         "released": 0}
        self.policy.attach(self)

    # ---- events ------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Decision]:
        self.now = max(self.now, event.now)
        self._out = []
        if isinstance(event, RequestArrived):
            self._arrived(event)
        elif isinstance(event, RequestFinished):
            self._finished(event)
        elif isinstance(event, ToolStarted):
            p = self.program(event.program_id)
            self._start_tool(p, event.tool, event.now)
        elif isinstance(event, ToolEnded):
            p = self.program(event.program_id)
            self._end_tool(p, event.now)
        elif isinstance(event, ProgramReleased):
            self._released(self.program(event.program_id), event.now)
        elif isinstance(event, BackendObserved):
            self._observed(event)
        elif isinstance(event, Tick):
            self.policy.on_tick(event.now)
        out, self._out = self._out, []
        return out

    def program(self, program_id: str) -> Program:
        p = self.programs.get(program_id)
        if p is None or p.status is Status.FINISHED:
            raise UnknownProgram(program_id)
        return p

    def touch(self, p: Program) -> None:
        """``p`` changed in a way that may change what it costs its backend (or its place in
        the waiting queue)."""
        if self.touched_programs is not None:
            self.touched_programs.add(p.id)

    def _arrived(self, e: RequestArrived) -> None:
        p = self.programs.get(e.program_id)
        if p is None or p.status is Status.FINISHED:
            p = self.programs[e.program_id] = Program(e.program_id, e.tenant, e.now, last_change=e.now,
                                                      prefix_key=e.prefix_key, prefix_tokens=e.prefix_tokens)
            self.waiting[p.id] = p
            new = True
        else:
            new = False
            if p.phase is Phase.ACTING:
                self._end_tool(p, e.now)
        p.phase = Phase.REASONING
        p.allowed = frozenset(e.backends) if e.backends else None
        self.touch(p)
        p.tokens = max(p.tokens, e.prompt_tokens)
        p.max_tokens = e.max_tokens
        p.pending.append(PendingRequest(e.rid, e.prompt_tokens, e.max_tokens, e.now))
        self._rid_program[e.rid] = p.id
        self.policy.on_request(p, new, e.now)
        if p.pending and p.status is not Status.ACTIVE:
            self._unless_held_for_ever(p)

    def _unless_held_for_ever(self, p: Program) -> None:
        """A program larger than every backend it may use would wait for room that never comes
        (a hostile or mistaken prompt longer than the KV pool): its call goes to the largest,
        whose engine runs it or refuses it, so the caller always gets an answer."""
        backends = self.healthy_backends(p)
        if backends and not any(self.policy.fits_alone(p, b) for b in backends):
            self.resume(p, max(backends, key=lambda b: (b.capacity, b.name)).name)

    def _finished(self, e: RequestFinished) -> None:
        pid = self._rid_program.pop(e.rid, None)
        backend = self._rid_backend.pop(e.rid, None)
        if backend is not None and backend in self.backends:
            self.backends[backend].inflight -= 1
        p = self.programs.get(pid) if pid else None
        if p is None or p.status is Status.FINISHED:
            return
        p.inflight.discard(e.rid)
        if e.aborted and p.pending:
            # given up while we held it (its caller left): it must not be dispatched later, to
            # nobody, and count as in flight for good
            p.pending = deque(r for r in p.pending if r.rid != e.rid)
        if e.aborted and not p.inflight and not p.pending:
            # its context is what the engine last confirmed, not the estimate of a call that
            # failed (say, a prompt refused as too long would otherwise count against the
            # backend's room until the program is released)
            p.tokens = p.settled_tokens
        self.touch(p)
        if not e.aborted:
            p.tokens = p.settled_tokens = e.prompt_tokens + e.completion_tokens
            p.requests += 1
            p.prompt_tokens_total += e.prompt_tokens
            p.cached_tokens_total += e.cached_tokens
            p.completion_tokens_total += e.completion_tokens
            p.attained += (e.prompt_tokens - e.cached_tokens) + 2 * e.completion_tokens
        if e.tool is not None and not p.inflight and not p.pending:
            self._start_tool(p, e.tool, e.now)
        else:
            self.policy.on_finished(p, e.now)

    def _start_tool(self, p: Program, tool: str, now: float) -> None:
        if p.phase is Phase.ACTING:
            return
        p.phase, p.tool, p.tool_started, p.last_change = Phase.ACTING, tool, now, now
        self.touch(p)
        self.policy.on_tool_start(p, now)

    def _end_tool(self, p: Program, now: float) -> None:
        if p.phase is not Phase.ACTING:
            return
        if p.tool is not None and p.tool_started is not None:
            self.tools.record(p.tool, now - p.tool_started)
        p.steps += 1
        p.phase, p.last_change = Phase.REASONING, now
        self.touch(p)
        self.policy.on_tool_end(p, now)
        p.tool, p.tool_started = None, None

    def _released(self, p: Program, now: float) -> None:
        if p.phase is Phase.ACTING:
            self._end_tool(p, now)
        if p.pinned and p.backend:
            self.unpin(p)
        self.policy.on_release(p, now)
        self._place(p, Status.FINISHED, None)
        self.counters["released"] += 1
        for r in p.pending:
            self._rid_program.pop(r.rid, None)
        p.pending.clear()
        self._out.append(CollectSandbox(p.id))
        del self.programs[p.id]
        self.policy.after_release(now)

    def _observed(self, e: BackendObserved) -> None:
        b = self.backends.get(e.backend)
        if b is None:
            b = self.backends[e.backend] = BackendView(e.backend, e.capacity_tokens)
            self.resident[b.name] = {}
        was_healthy = b.healthy
        b.capacity, b.used, b.running, b.queued = e.capacity_tokens, e.used_tokens, e.running, e.queued
        b.healthy, b.observed_at = e.healthy, e.now
        if e.ranks_kv is not None:
            b.ranks_kv = e.ranks_kv
        if was_healthy and not b.healthy:
            self._evict(b)
        self.policy.on_backend(b, e.now)

    def _evict(self, b: BackendView) -> None:
        """``b`` went down: its programs' KV is gone with it. They wait to be placed again
        (anywhere healthy: no affinity to a dead backend); calls in flight there fail on their
        own and come back as aborted."""
        for p in list(self.resident[b.name].values()):
            if p.pinned:
                self.unpin(p)
            self._place(p, Status.WAITING, None)
            p.backend, p.kept = None, True
            self.touch(p)
        if self.waiting:
            self.policy.after_release(self.now)  # room elsewhere may take them now

    # ---- actions for policies --------------------------------------------------------------

    def _place(self, p: Program, status: Status, backend: str | None) -> None:
        """The one place where a program's status or backend changes (keeps the indexes)."""
        self.touch(p)
        if p.status is Status.ACTIVE and p.backend is not None:
            self.resident[p.backend].pop(p.id, None)
        elif p.status in (Status.WAITING, Status.PAUSED):
            self.waiting.pop(p.id, None)
        p.status, p.backend = status, backend if backend is not None else p.backend
        self.touch(p)
        if status is Status.ACTIVE and p.backend is not None:
            self.resident[p.backend][p.id] = p
        elif status in (Status.WAITING, Status.PAUSED):
            self.waiting[p.id] = p

    def dispatch(self, p: Program, backend: str, priority: int | None = None) -> None:
        """Send every held request of ``p`` to ``backend`` (which then holds its KV)."""
        if p.backend != backend:
            self._place(p, p.status, backend)
        b = self.backends[backend]
        self.touch(p)  # it has calls in flight now (``FootprintIndex.busy``)
        p.held_s = p.held(self.now)  # the call waiting now, if any, stops waiting
        while p.pending:
            r = p.pending.popleft()
            p.inflight.add(r.rid)
            self._rid_backend[r.rid] = backend
            b.inflight += 1
            self.counters["dispatches"] += 1
            self._out.append(Dispatch(r.rid, p.id, backend, priority,
                                      self.now if self.policy.ranks_kv and b.ranks_kv and priority is None else None))

    def pause(self, p: Program) -> None:
        if p.status is Status.PAUSED:
            return
        self._place(p, Status.PAUSED, None)
        p.paused_at = self.now
        if p.pinned and p.backend:
            self.unpin(p)
        self.counters["pauses"] += 1
        self._out.append(Pause(p.id, p.backend))

    def resume(self, p: Program, backend: str, priority: int | None = None) -> None:
        was = p.status
        self._place(p, Status.ACTIVE, backend)
        p.paused_at = None
        if was is Status.PAUSED:
            self.counters["resumes"] += 1
            self._out.append(Resume(p.id, backend))
        if p.pending:
            self.dispatch(p, backend, priority)

    def pin(self, p: Program, until: float | None = None) -> None:
        if p.backend is None:
            return
        p.pin_until = until
        if not p.pinned:
            p.pinned = True
            self.counters["pins"] += 1
            self._out.append(Pin(p.id, p.backend))

    def retain(self, p: Program, until: float) -> None:
        """Rank ``p``'s cached KV as used at ``until`` (see ``Retain``); only where the backend
        evicts by priority (elsewhere a one-token request would only refresh its LRU order,
        which measured worse than nothing on ``coding``)."""
        if p.backend is not None and self.backends[p.backend].ranks_kv:
            p.retain_until = until
            self.counters["retains"] += 1
            self._out.append(Retain(p.id, p.backend, until))

    def unpin(self, p: Program) -> None:
        if p.pinned and p.backend is not None:
            p.pinned, p.pin_until = False, None
            self.counters["unpins"] += 1
            self._out.append(Unpin(p.id, p.backend))

    def prepare_sandbox(self, p: Program) -> None:
        if not p.sandbox_ready:
            p.sandbox_ready = True
            self._out.append(PrepareSandbox(p.id))

    def healthy_backends(self, p: Program | None = None) -> list[BackendView]:
        """Healthy backends; with ``p``, only those it may use."""
        if p is not None and p.allowed is not None:
            return [b for b in self.backends.values() if b.healthy and b.name in p.allowed]
        return [b for b in self.backends.values() if b.healthy]

    def snapshot(self) -> list[dict[str, object]]:
        return [p.snapshot() for p in self.programs.values()]

"""Virtual-time driver: the scheduler core running agent traces on simulated engines.

The same ``Scheduler`` the gateway uses receives the events an agent framework and
the engines would produce (request arrived, request finished, tool ended, backend
load, ticks) and its decisions are carried out on ``VirtualCluster`` engines: a
``Dispatch`` submits the program's whole context (the engine's radix cache decides
what is cached), a held request simply waits, ``Pin`` locks the program's cached
prefix (the Continuum baseline's lever), ``Retain`` is a one-token request over the
program's computed context carrying the rank as its priority (what the runtime sends SGLang for
a token-level call), sandboxes take time to become ready and hold disk until collected. Each policy's
engines run with the SGLang flags it declares (``Policy.engine_flags``). Closed loop: ``concurrency``
programs run at once; when one ends the next trace starts, so every policy sees the same programs in the same order.

Throughput, tokens and pauses are measured over the window (``run(duration_s)``). Completion
times are not: a program still running at the window's end would drop out of them, and the
policy that leaves the most programs unfinished would look fairest (at 160 coding programs over
an hour, thunderagent's p95 over completed programs was 2,573 s against program's 2,854 s,
with 97 against 77 programs over 2,000 s old still running). So after the window no new
program starts and the run goes on until every program started in it has finished; completion
times cover them all. A program still running at ``finish_limit`` windows counts at its age
then (a lower bound) and in ``unfinished``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from collections.abc import Iterator

from scheduler.core import (
    BackendObserved, BackendView, Decision, Dispatch, Pin, PrepareSandbox, ProgramReleased, RequestArrived,
    RequestFinished, Retain, Scheduler, Tick, ToolEnded, Unpin, CollectSandbox, policy_class,
)
from scheduler.sim.cluster import VirtualCluster, percentile
from scheduler.sim.engine import SimRequest
from scheduler.sim.workloads import Family, ProgramTrace


@dataclass
class AgenticResult:
    policy: str
    family: str
    concurrency: int
    sim_seconds: float
    steps: int
    programs_completed: int
    completion_s: list[float] = field(repr=False, default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    recomputed_tokens: int = 0
    retractions: int = 0
    peak_sandbox_bytes: int = 0
    pauses: int = 0
    resumes: int = 0
    retains: int = 0  # Retain decisions (each a one-token request)
    unfinished: int = 0  # programs started in the window still running at the finish limit
    wall_s: float = 0.0
    decision_p99_us: float = 0.0

    @property
    def steps_per_min(self) -> float:
        return 60 * self.steps / self.sim_seconds if self.sim_seconds else 0.0

    @property
    def kv_hit_ratio(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def figures(self) -> dict[str, float | int | None]:
        return {
            "steps_per_min": round(self.steps_per_min, 2),
            "mean_completion_s": (round(sum(self.completion_s) / len(self.completion_s), 1)
                                  if self.completion_s else None),
            "p95_completion_s": round(percentile(self.completion_s, 95), 1) if self.completion_s else None,
            "programs_completed": self.programs_completed,
            "unfinished": self.unfinished,
            "kv_hit_ratio": round(self.kv_hit_ratio, 4),
            "recomputed_tokens": self.recomputed_tokens,
            "retractions": self.retractions,
            "peak_sandbox_gb": round(self.peak_sandbox_bytes / 1024**3, 1),
            "pauses": self.pauses,
            "resumes": self.resumes,
            "retains": self.retains,
        }


class _Prog:
    __slots__ = ("trace", "id", "turn", "context", "computed", "started", "sandbox_ready_at", "rid")

    def __init__(self, trace: ProgramTrace, pid: str, context: list[int], now: float) -> None:
        self.trace, self.id, self.turn, self.context = trace, pid, 0, context
        self.computed = 0       # tokens of its context the engine has computed before
        self.started = now
        self.sandbox_ready_at: float | None = None
        self.rid = ""


class AgenticSimulation:
    def __init__(self, policy: str, family: Family, concurrency: int, *, engines: int = 1,
                 preset: str = "llama-3.1-70b-h100-tp4", kv_capacity_tokens: int | None = None, seed: int = 0,
                 start_spread_s: float = 10.0, max_tokens: int = 4096, engine_flags: dict | None = None,
                 **policy_options: object) -> None:
        self.family, self.concurrency, self.seed = family, concurrency, seed
        flags = policy_class(policy).engine_flags if engine_flags is None else engine_flags
        self.cluster = VirtualCluster(engines, preset, seed=seed, kv_capacity_tokens=kv_capacity_tokens,
                                      **flags)
        e0 = self.cluster.engines[0]
        per_token = e0.cost.recompute_s_per_token()
        self.sched = Scheduler(policy, backends=[
            BackendView(e.name, e.capacity, prefill_s_per_token=per_token,
                        ranks_kv=e.radix_eviction_policy == "priority" and not e.priority_scheduling)
            for e in self.cluster.engines],
            **policy_options)
        self.engine_index = {e.name: i for i, e in enumerate(self.cluster.engines)}
        self.system = self.cluster.fresh_tokens(family.system_tokens)
        self.traces: Iterator[ProgramTrace] = family.programs(seed)
        self.start_spread_s = start_spread_s
        self.max_tokens = max_tokens
        self.progs: dict[str, _Prog] = {}
        self.result = AgenticResult(policy, family.name, concurrency, 0.0, 0, 0)
        self._sandboxes: dict[str, float] = {}  # program id -> ready at
        self._decision_ns: list[int] = []
        self._rid_seq = 0
        self._starting = True  # False once the window is over: programs finish, none start

    # ---- the loop ----------------------------------------------------------------------------

    def run(self, duration_s: float, finish_limit: float = 8.0) -> AgenticResult:
        """Run the window, then finish the programs started in it (see the module docstring):
        the result's figures are the window's, its completion times every started program's."""
        t0 = time.perf_counter()
        clock = self.cluster.clock
        for i in range(self.concurrency):
            clock.call_at(self.start_spread_s * i / self.concurrency, self._start_next)
        self._start_ticker()
        self.cluster.run(duration_s)
        r = self.result
        r.sim_seconds = duration_s
        r.retractions = sum(e.stats.retractions for e in self.cluster.engines)
        r.pauses, r.resumes = self.sched.counters["pauses"], self.sched.counters["resumes"]
        r.retains = self.sched.counters["retains"]
        r.decision_p99_us = percentile([n / 1000 for n in self._decision_ns], 99) if self._decision_ns else 0.0
        window = replace(r, completion_s=[])  # the window's figures, before the finishing run adds to them
        self._starting = False
        limit = duration_s * finish_limit
        while self.progs and clock.now() < limit:
            self.cluster.run(min(limit, clock.now() + 60.0))
        now = clock.now()
        window.completion_s = r.completion_s + [now - prog.started for prog in self.progs.values()]
        window.unfinished = len(self.progs)
        window.wall_s = time.perf_counter() - t0
        self.result = window
        return window

    def _start_ticker(self) -> None:
        """From time 0, at the policy's tick: every engine's load, then the policy's tick (what
        the runtime's observation and timer do in real time)."""
        clock, tick = self.cluster.clock, self.sched.policy.tick_s

        def ticker() -> None:
            now = clock.now()
            for e in self.cluster.engines:
                self._handle(BackendObserved(now, e.name, e.capacity, e.used_tokens, e.num_running, len(e.waiting)))
            self._handle(Tick(now))
            clock.call_at(now + tick, ticker)

        clock.call_at(0.0, ticker)

    def _handle(self, event: object) -> None:
        t = time.perf_counter_ns()
        decisions = self.sched.handle(event)  # type: ignore[arg-type]
        self._decision_ns.append(time.perf_counter_ns() - t)
        for d in decisions:
            self._apply(d)

    def _apply(self, d: Decision) -> None:
        now = self.cluster.clock.now()
        if isinstance(d, Dispatch):
            prog = self.progs[d.program_id]
            turn = prog.trace.turns[prog.turn]
            rank = d.priority if d.priority is not None else int(d.retain_until or 0)
            req = SimRequest(rid=d.rid, input_ids=prog.context, max_new_tokens=turn.output_tokens, ignore_eos=True,
                             priority=rank, meta={"program": prog.id})
            self.cluster.submit(req, engine=self.engine_index[d.backend], on_finish=self._finished)
        elif isinstance(d, Pin):
            pinned = self.progs.get(d.program_id)
            if pinned is not None:
                self.cluster.engines[self.engine_index[d.backend]].pin(d.program_id, pinned.context)
        elif isinstance(d, Retain):
            # after the event that decided it: the finishing call's output joins the context first
            self.cluster.clock.call_at(now, lambda: self._retain(d))
        elif isinstance(d, Unpin):
            self.cluster.engines[self.engine_index[d.backend]].unpin(d.program_id)
        elif isinstance(d, PrepareSandbox):
            self._sandboxes.setdefault(d.program_id, now + self.family.sandbox_ready_s)
            self._account_disk()
        elif isinstance(d, CollectSandbox):
            self._sandboxes.pop(d.program_id, None)

    def _retain(self, d: Retain) -> None:
        prog = self.progs.get(d.program_id)
        if prog is None:
            return
        self._rid_seq += 1
        # token in, token out (as RL rollouts call /generate): the runtime resends the last
        # call's tokens and its output (ProgramRuntime._remember)
        req = SimRequest(rid=f"{prog.id}-retain-{self._rid_seq}", input_ids=prog.context[:prog.computed],
                         max_new_tokens=1, ignore_eos=True, priority=int(d.until), meta={"retain": prog.id})
        self.cluster.submit(req, engine=self.engine_index[d.backend], on_finish=self._retained)

    def _retained(self, req: SimRequest) -> None:
        """A Retain request's own cost: what it had to prefill again (its context was evicted)
        counts as recomputed; it is not a program's call."""
        if req.finish_reason != "abort":
            self.result.recomputed_tokens += max(0, req.prefilled_tokens - 1)

    def _account_disk(self) -> None:
        disk = len(self._sandboxes) * self.family.sandbox_bytes
        self.result.peak_sandbox_bytes = max(self.result.peak_sandbox_bytes, disk)

    # ---- programs ------------------------------------------------------------------------------

    def _start_next(self) -> None:
        if not self._starting:
            return
        trace = next(self.traces)
        now = self.cluster.clock.now()
        pid = f"prog-{trace.index}"
        context = self.system + self.cluster.fresh_tokens(trace.task_tokens)
        prog = self.progs[pid] = _Prog(trace, pid, context, now)
        self._request(prog)

    def _request(self, prog: _Prog) -> None:
        self._rid_seq += 1
        prog.rid = f"{prog.id}-t{prog.turn}-{self._rid_seq}"
        self._handle(RequestArrived(self.cluster.clock.now(), prog.id, prog.rid, len(prog.context),
                                    max_tokens=self.max_tokens, prefix_key="system",
                                    prefix_tokens=len(self.system)))

    def _finished(self, req: SimRequest) -> None:
        now = self.cluster.clock.now()
        prog = self.progs.get(req.meta["program"])
        if prog is None:
            return
        r = self.result
        if req.finish_reason != "abort":
            r.prompt_tokens += req.prompt_tokens
            r.cached_tokens += req.cached_tokens
            redo = max(0, min(req.prompt_tokens, prog.computed) - req.cached_tokens)
            redo += max(0, req.prefilled_tokens - (req.prompt_tokens - req.cached_tokens))
            r.recomputed_tokens += redo
        turn = prog.trace.turns[prog.turn]
        done = req.finish_reason == "abort" or turn.tool is None
        self._handle(RequestFinished(now, req.rid, req.prompt_tokens, req.completion_tokens, req.cached_tokens,
                                     tool=None if done else turn.tool, aborted=req.finish_reason == "abort"))
        if done:
            self._handle(ProgramReleased(now, prog.id))
            del self.progs[prog.id]
            if req.finish_reason != "abort":
                r.programs_completed += 1
                r.completion_s.append(now - prog.started)
            self._start_next()
            return
        prog.context = prog.context + req.output_ids[: req.generated]
        prog.computed = len(prog.context)
        prog.context = prog.context + self.cluster.fresh_tokens(turn.result_tokens)
        ready = self._sandboxes.get(prog.id)
        if ready is None:  # no one prepared it: it is created now, on the critical path
            ready = self._sandboxes[prog.id] = now + self.family.sandbox_ready_s
            self._account_disk()
        end = max(now, ready) + turn.tool_s
        self.cluster.clock.call_at(end, lambda: self._tool_done(prog))

    def _tool_done(self, prog: _Prog) -> None:
        if prog.id not in self.progs:
            return
        self.result.steps += 1
        prog.turn += 1
        now = self.cluster.clock.now()
        self._handle(ToolEnded(now, prog.id))
        self._request(prog)

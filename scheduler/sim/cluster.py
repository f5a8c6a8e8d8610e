"""Virtual-time driver: N simulated engines on one ``VirtualClock``, plus an agent workload.

The scheduler (later) drives it with ``submit(request, at, engine)`` and ``on_finish``
callbacks, and reads ``metrics()``; ``run_agents`` is the built-in closed-loop workload
(programs alternating an LLM call and a tool wait, context growing every turn) that lets a
policy be measured at cluster scale in seconds, identically for a given seed.
"""

from __future__ import annotations

import gc
import math
import random
from dataclasses import dataclass
from collections.abc import Callable

from scheduler.sim.clock import VirtualClock
from scheduler.sim.cost import CostModel, preset
from scheduler.sim.engine import EngineConfig, SimEngine, SimRequest
from scheduler.sim.script import Script
from scheduler.sim.tokenizer import VOCAB


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0-100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass(frozen=True)
class ClusterMetrics:
    sim_seconds: float
    requests_finished: int
    prompt_tokens: int
    cached_tokens: int
    generation_tokens: int
    retractions: int
    ttft_p50_s: float
    ttft_p99_s: float
    events: int
    agent_steps: int = 0

    @property
    def cache_hit_ratio(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def generation_tokens_per_s(self) -> float:
        return self.generation_tokens / self.sim_seconds if self.sim_seconds else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests_finished / self.sim_seconds if self.sim_seconds else 0.0

    @property
    def steps_per_minute(self) -> float:
        """Agent steps (one LLM call + one tool call) per minute, ThunderAgent's metric."""
        return 60 * self.agent_steps / self.sim_seconds if self.sim_seconds else 0.0


@dataclass(frozen=True)
class AgentWorkload:
    """Closed-loop agent programs; token counts are uniform in the given ranges, tool times
    log-normal (short and stable for SWE tools, with a tail, as ThunderAgent reports)."""

    programs: int = 200
    system_prompt_tokens: int = 2000  # shared by every program
    task_tokens: tuple[int, int] = (300, 1500)
    output_tokens: tuple[int, int] = (50, 400)
    tool_result_tokens: tuple[int, int] = (100, 1500)
    tool_median_s: float = 3.0
    tool_sigma: float = 0.8
    max_turns: int = 30
    start_spread_s: float = 60.0  # programs start uniformly over this window


class VirtualCluster:
    def __init__(self, n_engines: int, preset_name: str | CostModel = "llama-3.1-8b-h100", seed: int = 0,
                 script: Script | None = None, enable_priority_scheduling: bool = False,
                 kv_capacity_tokens: int | None = None, radix_eviction_policy: str = "lru") -> None:
        cost = preset(preset_name) if isinstance(preset_name, str) else preset_name
        self.seed = seed
        self.clock = VirtualClock()
        config = EngineConfig(cost=cost, enable_priority_scheduling=enable_priority_scheduling,
                              kv_capacity_tokens=kv_capacity_tokens, radix_eviction_policy=radix_eviction_policy)
        self.engines = [SimEngine(self.clock, config, script=script, name=f"engine-{i}") for i in range(n_engines)]
        self.agent_steps = 0
        self._totals = {"requests": 0, "prompt": 0, "cached": 0, "generated": 0}
        self._ttfts: list[float] = []  # aggregates only: finished requests hold long prompts
        self._next_token = VOCAB  # above every tokenizer id, so fresh ids never collide

    def fresh_tokens(self, n: int) -> list[int]:
        start, self._next_token = self._next_token, self._next_token + n
        return list(range(start, start + n))

    def submit(self, request: SimRequest, at: float | None = None, engine: int = 0,
               on_finish: Callable[[SimRequest], None] | None = None) -> None:
        """Deliver ``request`` to ``engine`` at virtual time ``at`` (now when None)."""

        def finished(req: SimRequest) -> None:
            if req.finish_reason != "abort":
                self._record(req)
            if on_finish is not None:
                on_finish(req)

        request.on_finish = finished
        when = self.clock.now() if at is None else at
        self.clock.call_at(when, lambda: self.engines[engine].submit(request))

    def abort(self, rid: str, engine: int, at: float | None = None) -> None:
        when = self.clock.now() if at is None else at

        def abort() -> None:
            self.engines[engine].abort(rid)

        self.clock.call_at(when, abort)

    def run(self, until: float | None = None) -> None:
        """Advance virtual time. The cyclic garbage collector is paused meanwhile: its scans walk
        every cached token list again and again (a third of the wall time of a cluster-hour),
        and the event loop creates no garbage cycles worth collecting on the way."""
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            self.clock.run(until)
        finally:
            if was_enabled:
                gc.enable()

    def _record(self, req: SimRequest) -> None:
        t = self._totals
        t["requests"] += 1
        t["prompt"] += req.prompt_tokens
        t["cached"] += req.cached_tokens
        t["generated"] += req.completion_tokens
        if req.ttft is not None:
            self._ttfts.append(req.ttft)

    def metrics(self) -> ClusterMetrics:
        t = self._totals
        return ClusterMetrics(
            sim_seconds=self.clock.now(),
            requests_finished=t["requests"],
            prompt_tokens=t["prompt"],
            cached_tokens=t["cached"],
            generation_tokens=t["generated"],
            retractions=sum(e.stats.retractions for e in self.engines),
            ttft_p50_s=percentile(self._ttfts, 50),
            ttft_p99_s=percentile(self._ttfts, 99),
            events=self.clock.events_run,
            agent_steps=self.agent_steps,
        )

    # ---- built-in workload --------------------------------------------------------------

    def run_agents(self, workload: AgentWorkload, duration_s: float) -> ClusterMetrics:
        """Run ``workload`` for ``duration_s`` virtual seconds; program i stays on engine
        i mod N (sticky placement, what a cache-aware router does when load is balanced)."""
        rng = random.Random(self.seed)
        system = self.fresh_tokens(workload.system_prompt_tokens)
        for i in range(workload.programs):
            _AgentProgram(self, workload, system, i, random.Random(f"{self.seed}/{i}")).start(
                rng.uniform(0, workload.start_spread_s))
        self.run(duration_s)
        return self.metrics()


class _AgentProgram:
    """One agent: turns of (LLM call on its growing context, tool wait); restarts when done."""

    def __init__(self, cluster: VirtualCluster, workload: AgentWorkload, system: list[int], index: int,
                 rng: random.Random) -> None:
        self.cluster, self.w, self.system, self.index, self.rng = cluster, workload, system, index, rng
        self.engine = index % len(cluster.engines)
        self.episode = 0
        self.turn = 0
        self.context: list[int] = []

    def _tokens(self, bounds: tuple[int, int]) -> list[int]:
        """Fresh token ids never seen before (tool output and tasks are unique text)."""
        return self.cluster.fresh_tokens(self.rng.randint(*bounds))

    def start(self, at: float) -> None:
        self.episode += 1
        self.turn = 0
        self.context = self.system + self._tokens(self.w.task_tokens)
        self._call(at)

    def _call(self, at: float) -> None:
        req = SimRequest(rid=f"p{self.index}-e{self.episode}-t{self.turn}", input_ids=self.context,
                         max_new_tokens=self.rng.randint(*self.w.output_tokens), ignore_eos=True,
                         meta={"program": self.index, "turn": self.turn})
        self.cluster.submit(req, at=at, engine=self.engine, on_finish=self._done)

    def _done(self, req: SimRequest) -> None:
        now = self.cluster.clock.now()
        tool_s = self.rng.lognormvariate(math.log(self.w.tool_median_s), self.w.tool_sigma)
        self.turn += 1
        if self.turn >= self.w.max_turns or req.finish_reason == "abort":  # done, or context too long
            self.start(now + tool_s)
            return
        # in place: the engine is done with this prompt list and the cache holds copies
        self.context.extend(req.output_ids[: req.generated])
        self.context.extend(self._tokens(self.w.tool_result_tokens))
        self.cluster.clock.call_at(now + tool_s, self._tool_done)

    def _tool_done(self) -> None:
        self.cluster.agent_steps += 1
        self._call(self.cluster.clock.now())

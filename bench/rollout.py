"""RL rollouts on the simulator: synchronous training steps of agent trajectories, per policy.

    .venv/bin/python bench/rollout.py --quick --json

What ThunderAgent's Table 2 (arXiv 2602.13692) measures: the rollout phase of agentic RL, where
each training step launches a batch of N = P prompts x G samples trajectories (GRPO: the G
samples of a prompt share its prompt), waits until **all** of them have finished, updates the
weights and starts the next step. A step's time is the batch's makespan, so the slowest
trajectory sets it; after each step the engines' prefix caches are flushed (new weights make
the cached KV stale, as RL frameworks flush after a weight update). Paper: 1.79x (mini-SWE-agent,
375.4 -> 671.8) and 3.92x (OpenHands, 69.1 -> 270.8) over vLLM behind SGLang's cache-aware gateway.

Settings (``SETTINGS``; parameters and sources at ``MINI_SWE`` and ``OPENHANDS`` below):
``mini_swe`` (short tool calls, up to 20 steps, moderate contexts) and ``openhands`` (a larger
system prompt, more steps, larger observations: long contexts and heavy KV pressure). Batch
shape after ThunderAgent's own RL example (``examples/rl_training/SkyRL``: 99 prompts x 4
samples on 4 engines, 396 trajectories a step): G = 4 samples, 24 prompts per engine
(96 trajectories per engine, the paper's 96 parallel programs), on 4 and 8 replicas of the
8B H100 preset.

Policies: ``request`` (the request-level baseline: FCFS dispatch, SGLang-gateway routing:
least loaded unless a program's previous backend is in balance), ``thunderagent`` (the best
per cell of ``bench/agentic.py``'s ``TA_VARIANTS``, all with asynchronous sandbox preparation)
and ``program``. Every trajectory of a group sends its shared prompt (system + task) as its
``prefix_key`` (the SDK's ``prefix_key`` for a GRPO group). ``--extras`` adds
``bench/agentic.py``'s extra runs (``program-aged``, ``program`` with its tail setting, among them).

Per setting, cell and policy: trajectories/min and agent steps/min (one step = one tool call;
the batch is fixed, so both ratios are the inverse ratio of rollout time), the mean training
step time (batch makespan), p95 trajectory time, KV hit rate, recomputed tokens, and where the
time goes (``accounting``): per trajectory, time held by the scheduler, engine queue + prefill
(TTFT), decode, and tool (sandbox wait included); the same for the trajectory that ended each
step last (``critical``); the engines' busy fraction and the engine-seconds of prefill spent
recomputing (``recompute_prefill_s``: tokens x the preset's per-token prefill time, attention
left out, so a lower bound on long contexts).
``--seeds`` gives mean and range over seeds. Virtual time: deterministic for a seed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.agentic import EXTRAS, RUNS, TA_VARIANTS, log, seed_stats, variant_wins, with_ratios
from scheduler.core import RequestArrived
from scheduler.sim.agentic import AgenticSimulation, _Prog
from scheduler.sim.cluster import percentile
from scheduler.sim.engine import SimRequest
from scheduler.sim.workloads import Family, ProgramTrace, ToolShape

# ---- settings -----------------------------------------------------------------------------------

# mini-SWE-agent as ThunderAgent trains it (repo ThunderAgent-org/ThunderAgent,
# examples/rl_training/SkyRL/skyrl-train/examples/mini_swe_agent/, read 2026-12):
# - system 1,500 tokens: swebench.yaml's system + instance templates are ~6,000 characters
#   (~4 characters a token) [medium-high].
# - task 300-2,500: SWE-Gym / SWE-bench problem statements, as ``coding`` [medium].
# - turns capped at 20: swebench.yaml ``step_limit: 20`` and ``generator.max_turns=20`` in the
#   launch script [high for the cap]; log-normal median 15, sigma 0.5 (about 28 % hit the cap)
#   [low for the shape].
# - output per turn: a THOUGHT and one bash command, as ``coding`` (median 150, 30-1,000) [medium].
# - observation: as ``coding`` (median 400, sigma 1.0) but capped at 2,500 tokens: the template
#   elides outputs past 10,000 characters [high for the cap].
# - context cap 40,960 (``generator.max_input_length``) [high].
# - tools: as ``coding`` (bash 0.8 s, edit 0.3 s, tests 6 s: "short and stable") [medium];
#   sandbox 2 GB (paper) [high], ready 5 s [low].
MINI_SWE = Family(
    name="mini_swe", system_tokens=1_500, task_tokens=(300, 2_500),
    turns_median=15, turns_sigma=0.5, turns_bounds=(3, 20),
    output_median=150, output_sigma=0.6, output_bounds=(30, 1_000),
    result_median=400, result_sigma=1.0, result_bounds=(20, 2_500),
    tools=(ToolShape("bash", 0.6, 0.8, 0.5), ToolShape("edit", 0.25, 0.3, 0.3), ToolShape("test", 0.15, 6.0, 0.5)),
    sandbox_bytes=2 * 1024**3, sandbox_ready_s=5.0, max_context_tokens=40_960,
)

# OpenHands (CodeActAgent) on SWE-bench-style tasks:
# - system 4,000: the CodeAct system prompt plus the tools' JSON schemas (execute_bash,
#   str_replace_editor, think, finish, ...) are several thousand tokens (REFERENCES.md:
#   "OpenHands' several k") [medium-low].
# - task 300-2,500 [medium].
# - turns median 30, sigma 0.5, 5-50: OpenHands runs to tens of iterations on SWE tasks; RL
#   recipes cap it at tens (50 here) [low].
# - output median 250 (a thought and a function call's JSON), 30-2,000 [low-medium].
# - observation median 1,000, sigma 1.0, 20-7,500: ``str_replace_editor view`` returns whole
#   files with line numbers; OpenHands truncates an observation at 30,000 characters [medium].
# - context cap 100,000 (the ``Family`` default, under a 128 k model context) [medium].
# - tools: bash 1.0 s, edit 0.3 s, tests 8 s (15 %) [low: as ``coding``, tests a bit longer].
# - sandbox 10 GB (paper: OpenHands > 10 GB) [high], ready 30 s: its runtime container is
#   larger and slower to start [low].
OPENHANDS = Family(
    name="openhands", system_tokens=4_000, task_tokens=(300, 2_500),
    turns_median=30, turns_sigma=0.5, turns_bounds=(5, 50),
    output_median=250, output_sigma=0.6, output_bounds=(30, 2_000),
    result_median=1_000, result_sigma=1.0, result_bounds=(20, 7_500),
    tools=(ToolShape("bash", 0.55, 1.0, 0.6), ToolShape("edit", 0.30, 0.3, 0.3), ToolShape("test", 0.15, 8.0, 0.6)),
    sandbox_bytes=10 * 1024**3, sandbox_ready_s=30.0,
)


@dataclass(frozen=True)
class Setting:
    family: Family
    paper: tuple[float, float]  # Table 2: request-level baseline -> ThunderAgent, steps/min
    target: float               # issue 18: program / request


SETTINGS = {
    "mini_swe": Setting(MINI_SWE, (375.4, 671.8), 2.0),
    "openhands": Setting(OPENHANDS, (69.1, 270.8), 4.0),
}
GROUP = 4                 # samples per prompt (the SkyRL example's n_samples_per_prompt)
PROMPTS_PER_ENGINE = 24   # 96 trajectories per engine
STEPS = 3
ENGINES = [4, 8]
QUICK_ENGINES, QUICK_PROMPTS_PER_ENGINE, QUICK_STEPS = [4], 4, 2  # 64 trajectories a step, 2 steps
START_SPREAD_S = 10.0     # a step's trajectories start (sandboxes requested) over this window


# ---- the simulation -----------------------------------------------------------------------------

@dataclass
class _Traj:
    step: int
    started: float
    ended: float | None = None
    completed: bool = False
    held: float = 0.0     # request waiting in the scheduler (paused / not yet admitted)
    ttft: float = 0.0     # engine queue + prefill, recomputation included
    decode: float = 0.0


@dataclass
class _Step:
    index: int
    start: float
    launched: int = 0
    ended: int = 0
    completed: int = 0
    end: float | None = None
    flushed: bool = True


@dataclass
class RolloutResult:
    setting: str
    policy: str
    engines: int
    steps: list[_Step] = field(default_factory=list)
    trajs: dict[str, _Traj] = field(default_factory=dict)
    agent_steps: int = 0
    llm_calls: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    recomputed_tokens: int = 0
    prefill_tokens: int = 0
    retractions: int = 0
    pauses: int = 0
    busy_s: float = 0.0
    prefill_s_per_token: float = 0.0
    wall_s: float = 0.0

    @property
    def rollout_s(self) -> float:
        """Sum of the steps' makespans (training time between steps is not rollout time)."""
        return sum((s.end or s.start) - s.start for s in self.steps)

    def figures(self) -> dict:
        t = self.rollout_s
        done = [tr for tr in self.trajs.values() if tr.ended is not None]
        ages = [tr.ended - tr.started for tr in done if tr.ended is not None]
        crit = [max((tr for tr in done if tr.step == s.index), key=lambda tr: tr.ended or 0.0)
                for s in self.steps if s.ended]
        spans = [(s.end or s.start) - s.start for s in self.steps]

        def split(trs: list[_Traj]) -> dict[str, float]:
            n = len(trs) or 1
            total = sum((tr.ended or tr.started) - tr.started for tr in trs) / n
            held, ttft, decode = (sum(getattr(tr, k) for tr in trs) / n for k in ("held", "ttft", "decode"))
            return {"total_s": round(total, 1), "held_s": round(held, 1), "queue_prefill_s": round(ttft, 1),
                    "decode_s": round(decode, 1), "tool_s": round(total - held - ttft - decode, 1)}

        p95 = round(percentile(ages, 95), 1) if ages else None
        return {
            "trajectories": sum(s.launched for s in self.steps),
            "completed": sum(s.completed for s in self.steps),
            "trajectories_per_min": round(60 * sum(s.completed for s in self.steps) / t, 2) if t else 0.0,
            "steps_per_min": round(60 * self.agent_steps / t, 2) if t else 0.0,
            "mean_step_s": round(sum(spans) / len(spans), 1) if spans else None,
            "step_s": [round(x, 1) for x in spans],
            "p95_trajectory_s": p95,
            "p95_completion_s": p95,  # the key ``bench.agentic.best_thunderagent`` breaks ties on
            "kv_hit_ratio": round(self.cached_tokens / self.prompt_tokens, 4) if self.prompt_tokens else 0.0,
            "recomputed_tokens": self.recomputed_tokens,
            "retractions": self.retractions,
            "pauses": self.pauses,
            "accounting": {
                "mean_trajectory": split(done),
                "critical": split(crit),
                "engine_busy_frac": round(self.busy_s / (self.engines * t), 3) if t else 0.0,
                "recompute_prefill_s": round(self.recomputed_tokens * self.prefill_s_per_token, 1),  # lower bound
                "prefill_tokens": self.prefill_tokens,
            },
        }


class RolloutSimulation(AgenticSimulation):
    """``AgenticSimulation`` driven as a synchronous RL loop instead of a closed loop: step k
    launches ``prompts x group`` trajectories (a group shares system + task tokens and sends them
    as its ``prefix_key``); when the last one ends, the engines' caches are flushed (new
    weights) and step k+1 starts ``train_s`` later."""

    def __init__(self, policy: str, setting: str, *, prompts: int, group: int, steps: int, engines: int,
                 preset: str = "llama-3.1-8b-h100", seed: int = 0, engine_flags: dict | None = None,
                 train_s: float = 0.0, flush: bool = True, start_spread_s: float = START_SPREAD_S,
                 **policy_options: Any) -> None:
        family = SETTINGS[setting].family
        super().__init__(policy, family, prompts * group, engines=engines, preset=preset, seed=seed,
                         engine_flags=engine_flags, kv_capacity_tokens=family.kv_capacity_tokens,
                         start_spread_s=start_spread_s, **policy_options)
        self.prompts, self.group, self.n_steps, self.train_s, self.flush = prompts, group, steps, train_s, flush
        self._starting = False  # the base class's closed loop never starts a program here
        self.out = RolloutResult(setting, policy, engines)
        self._asked: dict[str, float] = {}  # rid -> when the agent sent it
        self._prefix: dict[str, tuple[str, int]] = {}  # program id -> (group key, shared tokens)
        e0 = self.cluster.engines[0]
        self.out.prefill_s_per_token = e0.cost.prefill_time([(1000, 0)]) / 1000

    # ---- steps ----------------------------------------------------------------------------

    def run_steps(self, limit_s: float = 86_400.0) -> RolloutResult:
        t0 = time.perf_counter()
        clock = self.cluster.clock
        self._start_ticker()
        clock.call_at(0.0, lambda: self._launch(0))
        while sum(1 for s in self.out.steps if s.end is not None) < self.n_steps and clock.now() < limit_s:
            self.cluster.run(clock.now() + 300.0)
        o = self.out
        o.agent_steps, o.recomputed_tokens = self.result.steps, self.result.recomputed_tokens
        o.prompt_tokens, o.cached_tokens = self.result.prompt_tokens, self.result.cached_tokens
        o.retractions = sum(e.stats.retractions for e in self.cluster.engines)
        o.prefill_tokens = sum(e.stats.prefill_tokens for e in self.cluster.engines)
        o.busy_s = sum(e.stats.busy_time for e in self.cluster.engines)
        o.pauses = self.sched.counters["pauses"]
        o.wall_s = time.perf_counter() - t0
        return o

    def _launch(self, k: int) -> None:
        now = self.cluster.clock.now()
        step = _Step(k, now)
        self.out.steps.append(step)
        for g in range(self.prompts):
            group = k * self.prompts + g
            first = self.family.program(self.seed, group * self.group)
            task = self.system + self.cluster.fresh_tokens(first.task_tokens)  # the group's prompt
            for j in range(self.group):
                i = group * self.group + j
                trace = ProgramTrace(i, first.task_tokens, self.family.program(self.seed, i).turns)
                at = now + self.start_spread_s * (g * self.group + j) / self.concurrency
                self.cluster.clock.call_at(at, partial(self._start, trace, task, f"g{group}", step))
                step.launched += 1

    def _start(self, trace: ProgramTrace, context: list[int], key: str, step: _Step) -> None:
        now = self.cluster.clock.now()
        pid = f"traj-{trace.index}"
        self._prefix[pid] = (key, len(context))
        self.out.trajs[pid] = _Traj(step.index, now)
        prog = self.progs[pid] = _Prog(trace, pid, list(context), now)
        self._request(prog)

    def _request(self, prog: _Prog) -> None:
        self._rid_seq += 1
        prog.rid = f"{prog.id}-t{prog.turn}-{self._rid_seq}"
        now = self.cluster.clock.now()
        self._asked[prog.rid] = now
        key, shared = self._prefix[prog.id]
        self._handle(RequestArrived(now, prog.id, prog.rid, len(prog.context), max_tokens=self.max_tokens,
                                    prefix_key=key, prefix_tokens=shared))

    def _finished(self, req: SimRequest) -> None:
        pid = req.meta.get("program")
        tr = self.out.trajs.get(pid) if pid in self.progs else None
        asked = self._asked.pop(req.rid, req.arrival)
        if tr is not None and req.finish_reason != "abort":
            self.out.llm_calls += 1
            first = req.first_token_time if req.first_token_time is not None else req.arrival
            tr.held += req.arrival - asked
            tr.ttft += first - req.arrival
            tr.decode += (req.finish_time or first) - first
        super()._finished(req)
        if tr is not None and pid not in self.progs:  # the trajectory ended with this call
            self._ended(tr, completed=req.finish_reason != "abort")

    def _ended(self, tr: _Traj, completed: bool) -> None:
        now = self.cluster.clock.now()
        tr.ended, tr.completed = now, completed
        step = self.out.steps[tr.step]
        step.ended += 1
        step.completed += completed
        if step.ended == step.launched:
            step.end = now
            self.cluster.clock.call_at(now, lambda: self._next(step))

    def _next(self, step: _Step) -> None:
        """Weight update: the cached KV is stale, so flush it; then the next step."""
        if self.flush:
            step.flushed = all([e.flush_cache() for e in self.cluster.engines])  # noqa: C419 (every one, no short cut)
        if step.index + 1 < self.n_steps:
            self.cluster.clock.call_at(self.cluster.clock.now() + self.train_s, lambda: self._launch(step.index + 1))


# ---- the benchmark ------------------------------------------------------------------------------

def _simulate(job: tuple) -> dict:
    """One policy on one cell (a process-pool job)."""
    policy, flags, options, setting, engines, prompts, group, steps, seed, preset = job
    r = RolloutSimulation(policy, setting, prompts=prompts, group=group, steps=steps, engines=engines,
                          preset=preset, seed=seed, engine_flags=flags, **options).run_steps()
    return {**r.figures(), "flushed": all(s.flushed for s in r.steps), "wall_s": round(r.wall_s, 2)}


def run(settings: list[str], engines: list[int], prompts_per_engine: int, group: int, steps: int, seed: int,
        preset: str, pool: Executor, extras: bool = False) -> dict:
    runs = {**RUNS, **{k: ("thunderagent", None, o) for k, o in TA_VARIANTS.items()}, **(EXTRAS if extras else {})}
    out: dict = {"config": {"seed": seed, "group": group, "prompts_per_engine": prompts_per_engine,
                            "steps": steps, "preset": preset, "engines": engines, "ta_variants": TA_VARIANTS}}
    t0 = time.perf_counter()
    cells = [(s, e) for s in settings for e in engines]
    jobs = [(p, flags, opts, s, e, e * prompts_per_engine, group, steps, seed, preset)
            for s, e in cells for p, flags, opts in runs.values()]
    figures = iter(pool.map(_simulate, jobs))
    for s, e in cells:
        row = with_ratios({key: next(figures) for key in runs})
        for f in row.values():  # the batch is fixed: trajectories/min has the same ratios
            f["trajectories_per_min_vs_request"] = f["steps_per_min_vs_request"]
            f["trajectories_per_min_vs_thunderagent"] = f["steps_per_min_vs_thunderagent"]
        label = f"{e}x{e * prompts_per_engine * group}"
        out.setdefault(s, {})[label] = row
        log(f"{s:9s} {label:>7s}: " + "  ".join(
            f"{p} {row[p]['trajectories_per_min']:.1f} traj/min step {row[p]['mean_step_s']}s"
            for p in ("request", "thunderagent", "program")) + f" (TA {row['thunderagent']['variant']})")
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


FIGURES = ("trajectories_per_min", "steps_per_min", "steps_per_min_vs_request", "steps_per_min_vs_thunderagent",
           "mean_step_s", "p95_trajectory_s", "kv_hit_ratio", "recomputed_tokens")


def across_seeds(runs: dict[int, dict]) -> dict:
    """Per setting, cell and policy: mean, min and max over seeds of ``FIGURES``, the mean
    accounting, and which ThunderAgent variant won in how many seeds."""
    seeds = list(runs)
    first = runs[seeds[0]]
    out: dict = {"config": {**first["config"], "seeds": seeds, "seed": None}}
    for s in SETTINGS:
        if s not in first:
            continue
        out[s] = {}
        for label in first[s]:
            rows = [runs[x][s][label] for x in seeds]
            cell: dict = {}
            for key in rows[0]:
                f = seed_stats([r[key] for r in rows], FIGURES)
                f["accounting"] = _mean_accounting([r[key]["accounting"] for r in rows])
                f["completed_equals_launched"] = all(r[key]["completed"] == r[key]["trajectories"] for r in rows)
                cell[key] = f
            cell["thunderagent"]["variant_wins"] = variant_wins(rows)
            out[s][label] = cell
    out["wall_s"] = round(sum(r["wall_s"] for r in runs.values()), 1)
    return out


def _mean_accounting(accs: list[dict]) -> dict:
    def mean(values: list) -> object:
        if isinstance(values[0], dict):
            return {k: mean([v[k] for v in values]) for k in values[0]}
        return round(sum(values) / len(values), 3)
    return mean(accs)  # type: ignore[return-value]


def target_lines(summary: dict, across: bool) -> list[str]:
    """Issue 18's targets (printed, not enforced): program >= 2x request on ``mini_swe`` and
    >= 4x on ``openhands``, on the mean over seeds; and program against the best ThunderAgent."""
    m = "_mean" if across else ""
    lines = []
    for s, setting in SETTINGS.items():
        for label, row in summary.get(s, {}).items():
            p = row["program"]
            r, rt = p[f"steps_per_min_vs_request{m}"], p[f"steps_per_min_vs_thunderagent{m}"]
            ta = row["thunderagent"][f"steps_per_min_vs_request{m}"]
            rng = (f" (seeds {p['steps_per_min_vs_request_min']:.2f}-{p['steps_per_min_vs_request_max']:.2f})"
                   if across else "")
            paper = setting.paper[1] / setting.paper[0]
            lines.append(f"{s} {label}: program/request {r:.2f}x{rng} (target >= {setting.target:g}) "
                         f"{'ok' if r >= setting.target else 'MISSED'}; best-TA/request {ta:.2f}x "
                         f"(paper {paper:.2f}x); program/best-TA {rt:.2f}x")
    return lines


def print_table(summary: dict, across: bool) -> None:
    m = "_mean" if across else ""
    for s in SETTINGS:
        if s not in summary:
            continue
        print(f"\n{s}" + (" (mean over seeds; range in brackets)" if across else ""))
        print(f"{'cell':>7} {'run':>23} {'traj/min':>20} {'x request':>17} {'x best TA':>17} {'step s':>20}"
              f" {'p95 traj s':>12} {'KV hit':>7} {'recomputed':>11}  held/queue+prefill/decode/tool s (critical)")
        for label, row in summary[s].items():
            for key, f in row.items():
                def col(fig: str, fmt: str = ".2f", f: dict = f) -> str:
                    v = f.get(f"{fig}{m}")
                    if v is None:
                        return "-"
                    if across:
                        return f"{v:{fmt}} [{f[fig + '_min']:{fmt}}-{f[fig + '_max']:{fmt}}]"
                    return f"{v:{fmt}}"
                c = f["accounting"]["critical"]
                name = key + (f" {f['variant'][3:]}" if key == "thunderagent" and not across else "")
                print(f"{label:>7} {name:>23} {col('trajectories_per_min', '.1f'):>20} "
                      f"{col('steps_per_min_vs_request'):>17} {col('steps_per_min_vs_thunderagent'):>17} "
                      f"{col('mean_step_s', '.0f'):>20} {f.get('p95_trajectory_s' + m) or 0:>12.0f} "
                      f"{f.get('kv_hit_ratio' + m) or 0:>7.3f} {f.get('recomputed_tokens' + m) or 0:>11.3g}  "
                      f"{c['held_s']:.0f}/{c['queue_prefill_s']:.0f}/{c['decode_s']:.0f}/{c['tool_s']:.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 engines, 64 trajectories a step, 2 steps (< 1 min)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--engines", type=int, nargs="+", help=f"replica counts (default {ENGINES})")
    ap.add_argument("--prompts-per-engine", type=int, help=f"prompts a step per engine (default {PROMPTS_PER_ENGINE})")
    ap.add_argument("--group", type=int, default=GROUP, help="samples per prompt")
    ap.add_argument("--steps", type=int, help=f"training steps (default {STEPS})")
    ap.add_argument("--preset", default="llama-3.1-8b-h100")
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", help="mean and range over these seeds instead")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--extras", action="store_true", help="also bench/agentic.py's extra runs (program-aged, ...)")
    args = ap.parse_args()
    engines: list[int] = args.engines or (QUICK_ENGINES if args.quick else ENGINES)
    ppe: int = args.prompts_per_engine or (QUICK_PROMPTS_PER_ENGINE if args.quick else PROMPTS_PER_ENGINE)
    steps: int = args.steps or (QUICK_STEPS if args.quick else STEPS)
    if min(engines) < 1 or ppe < 1 or steps < 1 or args.group < 1 or args.workers < 1:
        ap.error("--engines, --prompts-per-engine, --steps, --group and --workers must be at least 1")
    seeds = args.seeds or [args.seed]
    with ProcessPoolExecutor(args.workers) as pool:
        runs = {s: run(args.settings, engines, ppe, args.group, steps, s, args.preset, pool, args.extras)
                for s in seeds}
    across = args.seeds is not None
    summary = across_seeds(runs) if across else runs[seeds[0]]
    if args.json:
        print(json.dumps(summary))
        return
    print_table(summary, across)
    print()
    for line in target_lines(summary, across):
        print(line)
    print(f"\nwall {summary['wall_s']} s")


if __name__ == "__main__":
    main()

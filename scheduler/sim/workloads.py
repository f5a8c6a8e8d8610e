"""Agent trace generators for scheduler benchmarks: seven documented families.

Each program is a list of turns: the model writes ``output_tokens``, calls ``tool``,
which takes ``tool_s`` seconds and returns ``result_tokens`` that join the context of
the next turn. The last turn has no tool (the final answer). Every program shares one
system prompt; each has its own task text. Draws are deterministic per (family, seed,
index), so every policy sees the same programs in the same order.

Parameters and where they come from (confidence in brackets):

``coding``: mini-SWE-agent / OpenHands on SWE-bench Lite, as ThunderAgent evaluates them.
- Shared system prompt 2,000 tokens: mini-SWE-agent's system + instance templates are
  ~1-2 k tokens, OpenHands' several k [medium].
- Task (issue text) 300-2,500 tokens uniform [medium: SWE-bench Lite problem statements
  are a few hundred to a few thousand tokens].
- Turns: log-normal, median 25, sigma 0.5, 5-80 [medium: mini-SWE-agent trajectories
  usually end within tens of steps].
- Output per turn: log-normal median 150 tokens (a THOUGHT and one bash command), 30-1,000
  [medium].
- Observation per turn: log-normal median 400 tokens, sigma 1.0, 20-4,000 (mini-SWE-agent
  truncates long outputs) [medium]. Contexts reach tens of thousands of tokens, as the
  issue and ThunderAgent describe.
- Tools "short and stable" (ThunderAgent): bash 0.8 s (sigma 0.5), edit 0.3 s (sigma 0.3),
  test runs 6 s (sigma 0.5) for 15 % of calls [medium: sandboxed shell commands].
- Sandbox 2 GB (ThunderAgent: mini-SWE-agent ~2 GB, OpenHands > 10 GB) [high], ready 5 s
  after it is prepared [low].

``stochastic``: tool-using research agents whose tools call remote services or run
simulations; ThunderAgent: "heavy-tailed (p99 tens to hundreds of seconds)".
- System prompt 1,500 shared; task 200-800; turns median 12 (3-40); output median 250;
  tool results median 800 tokens (sigma 0.8, 50-6,000: fetched pages, logs) [low-medium].
- Tools: search 2 s (sigma 0.6) 35 %, fetch 4 s (sigma 1.0) 35 %, simulate 20 s (sigma 1.2,
  p99 ~330 s) 15 %, python 3 s (sigma 1.5, p99 ~100 s) 15 % [low: shaped to the published
  p99 range, not fitted to a trace].
- Sandbox 1 GB, ready 5 s after it is prepared [low].

``fast_tools``: function-calling agents whose tools are local functions or quick API calls
(tau-bench, arXiv 2406.12045: tools are Python functions over a local database; BFCL v3
multi-turn).
- System prompt 3,000 shared (tau-bench puts its domain policy, a few thousand tokens, in the
  system prompt) [medium]; task 100-400 [medium]; turns median 15, 3-50 [medium: tau-bench
  conversations run to tens of messages]; output median 80 (a function call's JSON), 20-600
  [medium]; results median 250 (JSON records), 20-2,000 [medium].
- Tools: lookup 0.15 s (sigma 0.5) 60 %, api 0.6 s (sigma 0.6) 40 %: p99 about 2 s [low:
  in-process functions take milliseconds; remote APIs a few hundred ms].
- Sandbox 100 MB, ready 1 s [low].

``heavy_tail``: coding agents whose tools include test suites, builds and remote jobs: most
calls return in seconds, a few run many minutes (issue 18's "heavy-tailed tools").
- Context like ``coding`` (system 2,000, task 300-2,500, turns median 20, output median 200,
  results median 500) [medium, as ``coding``].
- Tools: shell 1.5 s (sigma 1.0) 55 %, test 10 s (sigma 1.8) 35 %, job 60 s (sigma 1.5) 10 %,
  each capped at 3,600 s: p50 about 3 s, p99 about 10 minutes, 2-3 % of calls past 5 minutes
  [low: shaped to the description, not fitted to a trace; the SWE-bench harness gives a test
  run up to 1,800 s, so runs of many minutes happen (medium)].

``long_tools``: long, stable tools, 30-60 s uniform (a fixed test suite, a build, a
simulation step of fixed size) [low: the issue's description]; system 1,500, task 300-1,500,
turns median 12 (3-30), output median 200, results median 600 [low-medium].

``memory``: memory pressure: long outputs (median 1,000 tokens, 200-4,000: reasoning models
write thousands of tokens of thought per turn) [medium], large tool results (median 2,000,
200-12,000: file dumps, web pages) [medium], turns median 8 (3-24), and a KV pool of 200 k
tokens instead of the preset's 360 k (``kv_capacity_tokens``: say a 70B model on fewer GPUs,
or a larger activation reserve) [low: chosen so that a median program of ~30 k tokens takes a
sixth of it]. Tools 3 s (sigma 0.8) 70 %, 10 s (sigma 1.0) 30 % [low].

``mix``: a server for several kinds of agents: whole programs drawn from ``coding`` 40 %,
``stochastic`` 20 %, ``fast_tools`` 20 %, ``heavy_tail`` 10 %, ``long_tools`` 10 %; one shared
system prompt of 2,000 tokens [low: an assumption, not a measured mix].
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from collections.abc import Iterator


@dataclass(frozen=True, slots=True)
class Turn:
    output_tokens: int
    tool: str | None
    tool_s: float = 0.0
    result_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ProgramTrace:
    index: int
    task_tokens: int
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class ToolShape:
    """A tool's duration: log-normal (``median_s``, ``sigma``), or uniform over ``uniform`` when
    set (stable tools whose time does not depend much on the call), capped at ``max_s``."""
    name: str
    weight: float
    median_s: float
    sigma: float
    uniform: tuple[float, float] | None = None
    max_s: float = math.inf

    def draw(self, rng: random.Random) -> float:
        if self.uniform is not None:
            return rng.uniform(*self.uniform)
        return min(self.max_s, rng.lognormvariate(math.log(self.median_s), self.sigma))


@dataclass(frozen=True)
class Family:
    name: str
    system_tokens: int
    task_tokens: tuple[int, int]
    turns_median: float
    turns_sigma: float
    turns_bounds: tuple[int, int]
    output_median: float
    output_sigma: float
    output_bounds: tuple[int, int]
    result_median: float
    result_sigma: float
    result_bounds: tuple[int, int]
    tools: tuple[ToolShape, ...]
    sandbox_bytes: int
    sandbox_ready_s: float
    max_context_tokens: int = 100_000
    # the KV pool its benchmark cells run with (None: the preset's); ``memory`` shrinks it
    kv_capacity_tokens: int | None = None

    def programs(self, seed: int = 0) -> Iterator[ProgramTrace]:
        i = 0
        while True:
            yield self.program(seed, i)
            i += 1

    def program(self, seed: int, index: int) -> ProgramTrace:
        rng = random.Random(f"{self.name}/{seed}/{index}")

        def logn(median: float, sigma: float, bounds: tuple[int, int]) -> int:
            return int(min(bounds[1], max(bounds[0], round(rng.lognormvariate(math.log(median), sigma)))))

        n = logn(self.turns_median, self.turns_sigma, self.turns_bounds)
        task = rng.randint(*self.task_tokens)
        context = self.system_tokens + task
        weights = [t.weight for t in self.tools]
        turns: list[Turn] = []
        for k in range(n):
            out = logn(self.output_median, self.output_sigma, self.output_bounds)
            context += out
            last = k == n - 1 or context > self.max_context_tokens - 8_000
            if last:
                turns.append(Turn(out, None))
                break
            shape = rng.choices(self.tools, weights)[0]
            result = logn(self.result_median, self.result_sigma, self.result_bounds)
            context += result
            turns.append(Turn(out, shape.name, shape.draw(rng), result))
        return ProgramTrace(index, task, tuple(turns))


CODING = Family(
    name="coding", system_tokens=2_000, task_tokens=(300, 2_500),
    turns_median=25, turns_sigma=0.5, turns_bounds=(5, 80),
    output_median=150, output_sigma=0.6, output_bounds=(30, 1_000),
    result_median=400, result_sigma=1.0, result_bounds=(20, 4_000),
    tools=(ToolShape("bash", 0.6, 0.8, 0.5), ToolShape("edit", 0.25, 0.3, 0.3), ToolShape("test", 0.15, 6.0, 0.5)),
    sandbox_bytes=2 * 1024**3, sandbox_ready_s=5.0,
)

STOCHASTIC = Family(
    name="stochastic", system_tokens=1_500, task_tokens=(200, 800),
    turns_median=12, turns_sigma=0.5, turns_bounds=(3, 40),
    output_median=250, output_sigma=0.6, output_bounds=(30, 1_500),
    result_median=800, result_sigma=0.8, result_bounds=(50, 6_000),
    tools=(ToolShape("search", 0.35, 2.0, 0.6), ToolShape("fetch", 0.35, 4.0, 1.0),
           ToolShape("simulate", 0.15, 20.0, 1.2), ToolShape("python", 0.15, 3.0, 1.5)),
    sandbox_bytes=1024**3, sandbox_ready_s=5.0,
)

FAST_TOOLS = Family(
    name="fast_tools", system_tokens=3_000, task_tokens=(100, 400),
    turns_median=15, turns_sigma=0.5, turns_bounds=(3, 50),
    output_median=80, output_sigma=0.6, output_bounds=(20, 600),
    result_median=250, result_sigma=0.8, result_bounds=(20, 2_000),
    tools=(ToolShape("lookup", 0.6, 0.15, 0.5), ToolShape("api", 0.4, 0.6, 0.6)),
    sandbox_bytes=100 * 1024**2, sandbox_ready_s=1.0,
)

HEAVY_TAIL = Family(
    name="heavy_tail", system_tokens=2_000, task_tokens=(300, 2_500),
    turns_median=20, turns_sigma=0.5, turns_bounds=(5, 60),
    output_median=200, output_sigma=0.6, output_bounds=(30, 1_000),
    result_median=500, result_sigma=1.0, result_bounds=(20, 4_000),
    tools=(ToolShape("shell", 0.55, 1.5, 1.0, max_s=3_600.0), ToolShape("test", 0.35, 10.0, 1.8, max_s=3_600.0),
           ToolShape("job", 0.10, 60.0, 1.5, max_s=3_600.0)),
    sandbox_bytes=2 * 1024**3, sandbox_ready_s=5.0,
)

LONG_TOOLS = Family(
    name="long_tools", system_tokens=1_500, task_tokens=(300, 1_500),
    turns_median=12, turns_sigma=0.4, turns_bounds=(3, 30),
    output_median=200, output_sigma=0.6, output_bounds=(30, 1_000),
    result_median=600, result_sigma=0.8, result_bounds=(50, 4_000),
    tools=(ToolShape("run", 1.0, 45.0, 0.0, uniform=(30.0, 60.0)),),
    sandbox_bytes=2 * 1024**3, sandbox_ready_s=5.0,
)

MEMORY = Family(
    name="memory", system_tokens=2_000, task_tokens=(300, 1_500),
    turns_median=8, turns_sigma=0.5, turns_bounds=(3, 24),
    output_median=1_000, output_sigma=0.6, output_bounds=(200, 4_000),
    result_median=2_000, result_sigma=0.8, result_bounds=(200, 12_000),
    tools=(ToolShape("read", 0.7, 3.0, 0.8), ToolShape("run", 0.3, 10.0, 1.0)),
    sandbox_bytes=2 * 1024**3, sandbox_ready_s=5.0, kv_capacity_tokens=200_000,
)


@dataclass(frozen=True)
class Mix:
    """Programs drawn from several families (each program wholly one family's), for a server
    that serves several kinds of agents at once. One shared system prompt (``system_tokens``);
    a sandbox is the largest component's and ready after the slowest one's delay."""
    name: str
    parts: tuple[tuple[Family, float], ...]
    system_tokens: int = 2_000

    @property
    def sandbox_bytes(self) -> int:
        return max(f.sandbox_bytes for f, _ in self.parts)

    @property
    def sandbox_ready_s(self) -> float:
        return max(f.sandbox_ready_s for f, _ in self.parts)

    @property
    def kv_capacity_tokens(self) -> int | None:
        return None

    def programs(self, seed: int = 0) -> Iterator[ProgramTrace]:
        i = 0
        while True:
            yield self.program(seed, i)
            i += 1

    def family_of(self, seed: int, index: int) -> Family:
        rng = random.Random(f"{self.name}/{seed}/{index}")
        return rng.choices([f for f, _ in self.parts], [w for _, w in self.parts])[0]

    def program(self, seed: int, index: int) -> ProgramTrace:
        return self.family_of(seed, index).program(seed, index)


MIX = Mix("mix", ((CODING, 0.4), (STOCHASTIC, 0.2), (FAST_TOOLS, 0.2), (HEAVY_TAIL, 0.1), (LONG_TOOLS, 0.1)))

FAMILIES: dict[str, Family | Mix] = {f.name: f for f in (CODING, STOCHASTIC, FAST_TOOLS, HEAVY_TAIL, LONG_TOOLS,
                                                         MEMORY, MIX)}

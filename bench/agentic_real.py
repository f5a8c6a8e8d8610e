"""The agentic benchmark on a real engine: the simulator's program traces, scaled down, run through the
service's scheduler runtime against the real SGLang CPU server, then the simulator on the same
traces with a cost model fitted to that server: predicted against measured.

    .venv/bin/python bench/agentic_real.py --quick --json     # < 10 min on 2 cores, server starts included

Why it exists: every policy figure of ``bench/agentic.py`` comes from the simulator. This runs the
same traces (``scheduler/sim/workloads.py``, family ``coding`` by default, seed 100) on SGLang 0.5.23
(``../shared/sglang-cpu``, SmolLM2-135M on CPU) started with a small KV pool
(``--max-total-tokens``) so that the programs' contexts together overflow it, for ``request``,
``thunderagent`` and ``program``, each on a server that inherits no other policy's cache (flushed,
or restarted when the policy declares other engine flags: ``program`` runs with
``--radix-eviction-policy priority``).

The path is the gateway's: ``scheduler.runtime.ProgramRuntime`` (what ``orchestrator/app.py``
builds for the OpenAI-compatible gateway) over ``scheduler.backends.sglang.SGLangBackend``; each
call is a streamed ``/generate`` over token ids, as the simulator's agents make. The HTTP hop
of the gateway itself (< 1 ms a call) is left out. A thin ``TraceBackend`` wrapper makes each call
write exactly the trace's number of tokens (``ignore_eos``) and reports the trace's tool call on
its last chunk (a 135M model fed random tokens calls no tools), which is what a chat call whose
answer called a tool looks like to the runtime. Tools are ``asyncio.sleep``s of the trace's time.

Scaling (``Scale``): context tokens (system prompt, task, tool results) x 1/16, outputs x 1/8
within 16-64 tokens, tools clamped to 0.5-5 s, at most ``max_turns`` turns (the last one is the
final answer). The simulator runs the *same scaled* traces (``ScaledFamily``), with no sandbox
delay (the real run has no sandboxes).

Calibration: a few direct ``/generate`` calls measure prefill time against prompt length (fresh
random tokens, one output token) and decode step time against batch size (streamed, the median
gap between tokens); ``fit_cost_model`` fits ``scheduler.sim.cost.CostModel`` to them (least
squares, non-negative terms) and the KV pool, running-request limit and chunk size come from the
server's ``/get_server_info``. The preset ``smollm2-135m-cpu`` is reported beside the fit.

Figures per policy: steps/min (over the window), KV hit ratio (the calls' ``cached_tokens`` /
``prompt_tokens``, plus SGLang's own ``/metrics`` counters over the whole run), recomputed tokens
(prefix tokens computed before that had to be prefilled again, Retain calls included), prefilled
tokens and p95 program time (programs started in the window, run to their end or counted at
their age at the finish limit, as ``scheduler/sim/agentic.py`` does). Ratios ``program/request``
and ``program/thunderagent``, measured and predicted, and their gap.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

import httpx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scheduler.backends.base import (
    Backend, Capacity, Generation, GenerateRequest, GenerationChunk, Load, ToolCall,
)
from scheduler.backends.sglang import SGLangBackend
from scheduler.core import BackendView, Scheduler, policy_class
from scheduler.runtime import ProgramRuntime
from scheduler.sim.agentic import AgenticSimulation
from scheduler.sim.cluster import percentile
from scheduler.sim.cost import CostModel, preset
from scheduler.sim.workloads import FAMILIES, Family, Mix, ProgramTrace, Turn

SGLANG_CPU = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "sglang-cpu")
POLICIES = ("request", "thunderagent", "program")
TENANT = "bench"
TOKEN_RANGE = (1000, 40000)  # ordinary SmolLM2 ids, clear of its special tokens
# SGLang flags per engine flag a policy declares (Policy.engine_flags). serve.sh always enables
# priority scheduling, under which ranks only leave the queue FCFS-like with these two
# (scheduler/backends/sglang.py: ranks_kv)
_FLAG_ARGS: dict[tuple[str, object], list[str]] = {
    ("radix_eviction_policy", "priority"): ["--radix-eviction-policy", "priority",
                                           "--schedule-low-priority-values-first", "--disable-priority-preemption"]}


def log(msg: str) -> None:
    print(f"[agentic_real {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- traces, scaled down ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """How a simulator trace is shrunk to fit a 135M model on two CPU cores."""
    context: float = 1 / 16          # system prompt, task and tool results
    output: float = 1 / 8
    output_bounds: tuple[int, int] = (16, 64)
    tool_bounds: tuple[float, float] = (0.5, 5.0)
    max_turns: int = 6

    def trace(self, t: ProgramTrace) -> ProgramTrace:
        """The scaled trace: token counts scaled (at least one token), tool times clamped, turns
        cut at ``max_turns`` with the last one turned into the final answer (no tool)."""
        lo, hi = self.output_bounds
        turns = []
        for turn in t.turns[: self.max_turns]:
            out = min(hi, max(lo, round(turn.output_tokens * self.output)))
            if turn.tool is None:
                turns.append(Turn(out, None))
                continue
            tool_s = min(self.tool_bounds[1], max(self.tool_bounds[0], turn.tool_s))
            turns.append(Turn(out, turn.tool, tool_s, max(1, round(turn.result_tokens * self.context))))
        last = turns[-1]
        turns[-1] = Turn(last.output_tokens, None)
        return ProgramTrace(t.index, max(1, round(t.task_tokens * self.context)), tuple(turns))

    def tokens(self, n: int) -> int:
        return max(1, round(n * self.context))


@dataclass(frozen=True)
class ScaledFamily:
    """A workload family's traces through ``Scale``; what ``AgenticSimulation`` needs of a family
    (duck-typed like ``workloads.Mix``), with no sandbox delay: the real run has no sandboxes."""
    base: Family | Mix
    scale: Scale

    @property
    def name(self) -> str:
        return f"{self.base.name}-scaled"

    @property
    def system_tokens(self) -> int:
        return self.scale.tokens(self.base.system_tokens)

    sandbox_bytes: int = 0
    sandbox_ready_s: float = 0.0
    kv_capacity_tokens: int | None = None

    def program(self, seed: int, index: int) -> ProgramTrace:
        return self.scale.trace(self.base.program(seed, index))

    def programs(self, seed: int = 0) -> Iterator[ProgramTrace]:
        i = 0
        while True:
            yield self.program(seed, i)
            i += 1


# ---- the cost model, fitted to measured points -------------------------------------------------


def nonneg_lstsq(rows: Sequence[Sequence[float]], ys: Sequence[float]) -> list[float]:
    """Least squares with every coefficient >= 0: a term whose fit comes out negative (noise on a
    small effect, e.g. attention at short prompts) is dropped and the rest fitted again. A cost
    model with a negative term would make some step cheaper the bigger it is."""
    a = np.asarray(rows, dtype=float)
    y = np.asarray(ys, dtype=float)
    active = list(range(a.shape[1]))
    coef = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return [float(c) for c in coef]


@dataclass(frozen=True)
class PrefillPoint:
    tokens: int        # prompt tokens, none cached
    seconds: float     # one prefill forward (and its one output token)


@dataclass(frozen=True)
class DecodePoint:
    batch: int
    context_tokens: int  # KV of all running sequences together, mid-run
    step_s: float


def fit_cost_model(prefill: Sequence[PrefillPoint], decode: Sequence[DecodePoint], *, name: str,
                   kv_capacity_tokens: int, max_running_requests: int, chunked_prefill_size: int,
                   context_length: int) -> CostModel:
    """``CostModel`` from measurements: prefill t = overhead + n x per_token + n^2/2 x per_pair
    (a prompt with nothing cached: prefix 0, as ``CostModel.prefill_time`` counts pairs), decode
    t = base + batch x per_seq + context x per_context_token."""
    if len(prefill) < 2 or len(decode) < 2:
        raise ValueError("need at least two prefill and two decode points")
    p = nonneg_lstsq([[1.0, q.tokens, q.tokens * q.tokens / 2] for q in prefill], [q.seconds for q in prefill])
    d = nonneg_lstsq([[1.0, q.batch, q.context_tokens] for q in decode], [q.step_s for q in decode])
    return CostModel(name=name, description="fitted at run time to the real SGLang CPU server (bench/agentic_real.py)",
                     prefill_overhead_s=p[0], prefill_per_token_s=p[1], prefill_attn_per_pair_s=p[2],
                     decode_base_s=d[0], decode_per_seq_s=d[1], decode_per_context_token_s=d[2],
                     kv_capacity_tokens=kv_capacity_tokens, max_running_requests=max_running_requests,
                     chunked_prefill_size=chunked_prefill_size, context_length=context_length)


def model_error(cost: CostModel, prefill: Sequence[PrefillPoint], decode: Sequence[DecodePoint]) -> dict[str, float]:
    """Mean absolute relative error of a cost model on measured points (how well the preset, or
    the fit, describes this server now)."""
    pe = [abs(cost.prefill_time([(q.tokens, 0)]) / q.seconds - 1) for q in prefill]
    de = [abs(cost.decode_step_time(q.batch, q.context_tokens) / q.step_s - 1) for q in decode]
    return {"prefill_mean_rel_error": round(statistics.fmean(pe), 3),
            "decode_mean_rel_error": round(statistics.fmean(de), 3)}


# ---- the server ---------------------------------------------------------------------------------


def policy_flags(policy: str) -> list[str]:
    """The SGLang flags the policy declares (``Policy.engine_flags``), as serve.sh arguments."""
    out: list[str] = []
    for k, v in policy_class(policy).engine_flags.items():
        args = _FLAG_ARGS.get((k, v))
        if args is None:
            raise SystemExit(f"policy {policy} wants engine flag {k}={v}, which this bench cannot set")
        out += args
    return out


class Server:
    """One real SGLang server via ../shared/sglang-cpu's serve.sh / stop.sh."""

    def __init__(self, port: int, kv_tokens: int, threads: int | None = None) -> None:
        self.port, self.kv_tokens, self.threads = port, kv_tokens, threads
        self.flags: list[str] | None = None
        self.url = f"http://127.0.0.1:{port}"

    def ensure(self, flags: list[str]) -> bool:
        """A server with these flags and an empty cache; True when it was (re)started."""
        if self.flags == flags:
            self.flush()
            return False
        self.stop()
        t0 = time.perf_counter()
        cmd = [os.path.join(SGLANG_CPU, "serve.sh"), str(self.port), "--max-total-tokens", str(self.kv_tokens), *flags]
        log("starting " + " ".join(cmd[1:]))
        env = dict(os.environ)
        if self.threads:
            # torch's OpenMP threads spin-wait; on a machine shared with other work, two of them on
            # two cores made some decode steps 10x slower (700 ms instead of 60)
            env["OMP_NUM_THREADS"] = str(self.threads)
        subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=sys.stderr, timeout=300, env=env)
        self.flags = flags
        log(f"server up in {time.perf_counter() - t0:.1f} s")
        return True

    def flush(self) -> None:
        """Empty the radix cache. SGLang flushes only when no request runs or waits (aborted calls
        of the last run may still be leaving), so it waits for idle and checks the answer."""
        deadline = time.monotonic() + 60
        status = None
        while True:
            load = httpx.get(f"{self.url}/v1/loads", timeout=30).json()["loads"][0]
            busy = load.get("num_running_reqs", 0) + load.get("num_waiting_reqs", 0)
            if not busy:
                status = httpx.post(f"{self.url}/flush_cache", timeout=30).status_code
                if status == 200:
                    log("flushed the cache")
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"could not flush the cache: {busy} requests, last answer {status}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.flags is None:
            return
        subprocess.run([os.path.join(SGLANG_CPU, "stop.sh"), str(self.port)], stdout=sys.stderr, stderr=sys.stderr,
                       timeout=120)
        self.flags = None

    def info(self) -> dict:
        return httpx.get(f"{self.url}/get_server_info", timeout=30).json()



def server_counters(url: str) -> dict[str, float]:
    """SGLang's ``*_total`` counters from ``/metrics``, summed over label sets."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("sglang:") and "_total" in line.split(" ")[0]:
            name = line.split("{")[0].split(" ")[0]
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def server_log_path(port: int) -> str:
    home = os.environ.get("SGLANG_CPU_HOME") or os.path.expanduser("~/.cache/sglang-cpu")
    return os.path.join(home, "run", f"server-{port}.log")


_LOG_RE = re.compile(r"Decode batch, #running-req: (\d+), #token: (\d+),.*gen throughput \(token/s\): ([\d.]+)")


_PREFILL_RE = re.compile(r"Prefill batch, #new-seq: (\d+), #new-token: (\d+), #cached-token: (\d+)")


def in_run_decode(lines: Sequence[str], cost: CostModel) -> dict[str, float | int | None]:
    """SGLang's own log lines of a run against the cost model. ``Decode batch`` (one per 40
    decode steps: running requests, KV tokens, generation tokens/s over the interval, prefills in
    it included) against what the model says a decode step of that batch and context gives; and
    the ``Prefill batch`` forwards (each pays the fixed prefill overhead, and holds every running
    decode meanwhile) with the engine time the model gives them. How far the run's engine was from
    the calibrated one, and where (a shared machine's load, prefills between decode steps)."""
    seen = [(int(m[1]), int(m[2]), float(m[3])) for m in map(_LOG_RE.search, lines) if m]
    fills = [(int(m[1]), int(m[2]), int(m[3])) for m in map(_PREFILL_RE.search, lines) if m]
    out: dict[str, float | int | None] = {
        "decode_log_lines": len(seen), "mean_batch": None, "measured_tok_s": None, "model_tok_s": None,
        "prefill_forwards": len(fills), "prefill_new_tokens": sum(t for _, t, _ in fills),
        "model_prefill_s": round(sum(cost.prefill_time([(t, c // max(1, n))]) for n, t, c in fills), 1)}
    if seen:
        model = [b / cost.decode_step_time(b, tokens) for b, tokens, _ in seen]
        out.update(mean_batch=round(statistics.fmean(b for b, _, _ in seen), 2),
                   measured_tok_s=round(statistics.fmean(t for _, _, t in seen), 2),
                   model_tok_s=round(statistics.fmean(model), 2))
    return out


# ---- calibration ----------------------------------------------------------------------------------


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(*TOKEN_RANGE) for _ in range(n)]


async def measure(url: str, quick: bool, seed: int) -> tuple[list[PrefillPoint], list[DecodePoint]]:
    """Direct ``/generate`` calls on an idle server: prefill of fresh prompts of several lengths
    (one output token), then decode steps at several batch sizes and context lengths (streamed;
    the median gap between a request's tokens after its first). Each point is the median of
    ``repeats`` tries, taken in rounds so that a burst of load from elsewhere on a shared machine
    lands on one try of each, not on every try of one."""
    rng = random.Random(f"calibrate/{seed}")
    lengths = [32, 128, 256, 512] if quick else [32, 64, 128, 256, 512, 768, 1024]
    configs = [(1, 32), (2, 32), (4, 32), (8, 32), (1, 768), (4, 256)]  # (batch, prompt tokens)
    if not quick:
        configs += [(12, 32), (16, 32), (2, 1024)]
    repeats = 2 if quick else 3
    steps = 16 if quick else 48
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def prefill_once(n: int) -> tuple[int, float]:
            body = {"input_ids": _ids(rng, n), "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
            t0 = time.perf_counter()
            r = await client.post("/generate", json=body)
            r.raise_for_status()
            return n - r.json()["meta_info"].get("cached_tokens", 0), time.perf_counter() - t0

        async def stream_one(prompt: int, new: int) -> list[float]:
            body = {"input_ids": _ids(rng, prompt), "stream": True,
                    "sampling_params": {"max_new_tokens": new, "temperature": 0, "ignore_eos": True}}
            stamps = []
            async with client.stream("POST", "/generate", json=body) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if line.startswith("data:") and "[DONE]" not in line:
                        stamps.append(time.perf_counter())
            return [b - a for a, b in itertools.pairwise(stamps[1:])]  # decode steps, after the first

        async def decode_once(batch: int, prompt: int) -> float:
            gaps = [g for gs in await asyncio.gather(*(stream_one(prompt, steps) for _ in range(batch))) for g in gs]
            return statistics.median(gaps)

        await prefill_once(256)  # warm-up: first forwards of a fresh server are slow
        await asyncio.gather(*(stream_one(32, 8) for _ in range(2)))
        tries: dict[int, list[float]] = {n: [] for n in lengths}
        steps_of: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
        for _ in range(repeats):
            for n in lengths:
                new, dt = await prefill_once(n)
                tries[n].append(dt * n / max(1, new))  # as if none was cached (random ids: nothing is)
            for c in configs:
                steps_of[c].append(await decode_once(*c))
        prefill = [PrefillPoint(n, statistics.median(v)) for n, v in tries.items()]
        decode = [DecodePoint(b, b * (p + steps // 2), statistics.median(v)) for (b, p), v in steps_of.items()]
    for q in prefill:
        log(f"prefill {q.tokens} tokens: {q.seconds:.3f} s ({q.tokens / q.seconds:.0f} tokens/s) "
            f"tries {[round(x, 3) for x in tries[q.tokens]]}")
    for (b, p), d in zip(configs, decode, strict=True):
        log(f"decode batch {b}, prompt {p}: {d.step_s * 1000:.1f} ms/step ({b / d.step_s:.0f} tokens/s) "
            f"tries {[round(x * 1000, 1) for x in steps_of[(b, p)]]}")
    return prefill, decode


# ---- the real run ---------------------------------------------------------------------------------


class TraceBackend(Backend):
    """The SGLang backend, with each trace call writing exactly its trace's tokens and answering
    with its trace's tool call; any other call (the runtime's Retain) goes through as it is. Every
    call's usage is tallied here, so Retain's re-prefill counts too."""

    def __init__(self, inner: SGLangBackend) -> None:
        self.inner = inner
        self.name = inner.name
        self.plan: dict[str, tuple[int, str | None]] = {}  # rid -> (output tokens, tool)
        self.retain_calls = 0
        self.retain_recomputed = 0

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        plan = self.plan.get(request.rid)
        if plan is None:
            async for chunk in self.inner.stream(request):
                if chunk.usage is not None and chunk.finish_reason != "abort":
                    self.retain_calls += 1
                    self.retain_recomputed += max(0, chunk.usage.prompt_tokens - chunk.usage.cached_tokens - 1)
                yield chunk
            return
        out, tool = plan
        sampling = {"max_new_tokens": out, "temperature": 0.0, "ignore_eos": True}
        exact = request.model_copy(update={"extra_body": {**request.extra_body, "sampling_params": sampling}})
        async for chunk in self.inner.stream(exact):
            if chunk.finish_reason not in (None, "abort") and tool is not None:
                chunk = chunk.model_copy(update={"finish_reason": "tool_calls", "tool_calls": [
                    ToolCall(id=f"call-{request.rid}", name=tool, arguments="{}")]})
            yield chunk

    async def abort(self, rid: str) -> None:
        await self.inner.abort(rid)

    async def capacity(self) -> Capacity:
        return await self.inner.capacity()

    async def load(self) -> Load:
        return await self.inner.load()

    async def health(self) -> bool:
        return await self.inner.health()

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class Tally:
    steps: int = 0
    calls: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    recomputed_tokens: int = 0
    programs_completed: int = 0
    completion_s: list[float] = field(default_factory=list)


async def run_real(policy: str, url: str, family: ScaledFamily, *, programs: int, seed: int, window_s: float,
                   finish_s: float, start_spread_s: float, max_tokens: int, prefill_s_per_token: float,
                   policy_options: dict) -> dict:
    """Closed loop of ``programs`` programs through ``ProgramRuntime`` for ``window_s`` wall
    seconds; then programs started in the window finish (for at most ``finish_s``)."""
    backend = TraceBackend(SGLangBackend(url, name="sglang"))
    runtime = ProgramRuntime({"sglang": backend}, policy=policy, prefill_s_per_token=prefill_s_per_token)
    if policy_options:  # the runtime takes no policy options: the same core, built with them
        runtime.sched = Scheduler(policy, backends=[BackendView("sglang", 0, prefill_s_per_token=prefill_s_per_token)],
                                  **policy_options)
    await runtime.start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    system = _ids(random.Random(f"system/{seed}"), family.system_tokens)
    traces = family.programs(seed)
    live: dict[str, tuple[asyncio.Task[None], float]] = {}
    errors: list[Exception] = []
    tally = Tally()
    window: Tally | None = None
    starting = True

    def in_window() -> bool:
        return window is None

    async def program(trace: ProgramTrace) -> None:
        pid = f"prog-{trace.index}"
        rng = random.Random(f"program/{seed}/{trace.index}")
        context = system + _ids(rng, trace.task_tokens)
        computed = 0
        started = loop.time()
        try:
            for k, turn in enumerate(trace.turns):
                rid = f"{pid}-t{k}-{uuid.uuid4().hex[:8]}"
                backend.plan[rid] = (turn.output_tokens, turn.tool)
                request = GenerateRequest(rid=rid, input_ids=context, max_tokens=max_tokens)
                chunks = [c async for c in runtime.stream(pid, TENANT, request, prefix_key="system",
                                                          prefix_tokens=len(system))]
                backend.plan.pop(rid, None)
                gen = Generation.from_chunks(rid, chunks)
                if gen.finish_reason == "abort":
                    raise RuntimeError(f"{rid} aborted by the engine")
                u = gen.usage
                tally.calls += 1
                tally.prompt_tokens += u.prompt_tokens
                tally.cached_tokens += u.cached_tokens
                tally.recomputed_tokens += max(0, min(u.prompt_tokens, computed) - u.cached_tokens)
                if turn.tool is None:
                    break
                context = context + gen.token_ids
                computed = len(context)
                context = context + _ids(rng, turn.result_tokens)
                await asyncio.sleep(turn.tool_s)
                runtime.tool_ended(pid, TENANT)
                tally.steps += 1
            runtime.release(pid, TENANT)
            tally.programs_completed += 1
            tally.completion_s.append(loop.time() - started)
        except Exception as exc:  # a failed call: counted and logged, the loop goes on
            errors.append(exc)
            log(f"{policy}: {pid} failed: {exc!r}")
        finally:
            live.pop(pid, None)
            if starting:
                start_next()

    def start_next() -> None:
        trace = next(traces)
        task = asyncio.create_task(program(trace), name=f"prog-{trace.index}")
        live[f"prog-{trace.index}"] = (task, loop.time())

    async def first(i: int) -> None:
        await asyncio.sleep(start_spread_s * i / programs)
        if starting:
            start_next()

    before = await asyncio.to_thread(server_counters, url)
    starters = [asyncio.create_task(first(i)) for i in range(programs)]
    try:
        await asyncio.sleep(window_s)
        starting = False
        window = replace(tally, completion_s=[])
        sched = runtime.sched.counters
        window_counters = {"pauses": sched["pauses"], "resumes": sched["resumes"], "retains": sched["retains"]}
        log(f"{policy}: window over ({tally.steps} steps); finishing {len(live)} programs (at most {finish_s:.0f} s)")
        if live:  # no program starts after the window: these are all there are to wait for
            await asyncio.wait([t for t, _ in live.values()], timeout=finish_s)
        now = loop.time()
        unfinished = [(pid, now - started) for pid, (_, started) in live.items()]
        for t, _ in list(live.values()):
            t.cancel()
        await asyncio.gather(*(t for t, _ in list(live.values())), *starters, return_exceptions=True)
    finally:
        starting = False
        for t in starters:
            t.cancel()
        for t, _ in list(live.values()):
            t.cancel()
        await runtime.close()
        await backend.close()
    after = await asyncio.to_thread(server_counters, url)
    completion = tally.completion_s + [age for _, age in unfinished]
    w = window
    server_prompt = after.get("sglang:prompt_tokens_total", 0) - before.get("sglang:prompt_tokens_total", 0)
    server_cached = after.get("sglang:cached_tokens_total", 0) - before.get("sglang:cached_tokens_total", 0)
    if errors:
        log(f"{policy}: {len(errors)} programs failed: {errors[0]!r}")
    return {
        "steps_per_min": round(60 * w.steps / window_s, 2),
        "steps": w.steps,
        "mean_completion_s": round(statistics.fmean(completion), 1) if completion else None,
        "p95_completion_s": round(percentile(completion, 95), 1) if completion else None,
        "programs_completed": w.programs_completed,
        "unfinished": len(unfinished),
        "kv_hit_ratio": round(w.cached_tokens / w.prompt_tokens, 4) if w.prompt_tokens else 0.0,
        "prompt_tokens": w.prompt_tokens,
        "cached_tokens": w.cached_tokens,
        "prefilled_tokens": w.prompt_tokens - w.cached_tokens,
        "recomputed_tokens": w.recomputed_tokens + backend.retain_recomputed,
        "retain_calls": backend.retain_calls,
        **window_counters,
        "server_prompt_tokens": int(server_prompt),
        "server_cached_tokens": int(server_cached),
        "server_kv_hit_ratio": round(server_cached / server_prompt, 4) if server_prompt else 0.0,
        "failed_programs": len(errors),
        "wall_s": round(loop.time() - t0, 1),
    }


# ---- the simulator on the same traces --------------------------------------------------------------


def run_sim(policy: str, family: ScaledFamily, cost: CostModel, *, programs: int, seed: int, window_s: float,
            finish_s: float, start_spread_s: float, max_tokens: int, policy_options: dict) -> dict:
    sim = AgenticSimulation(policy, family, programs, preset=cost, kv_capacity_tokens=cost.kv_capacity_tokens,  # type: ignore[arg-type]
                            seed=seed, start_spread_s=start_spread_s, max_tokens=max_tokens, **policy_options)
    r = sim.run(window_s, finish_limit=(window_s + finish_s) / window_s)
    f = r.figures()
    return {"steps_per_min": f["steps_per_min"], "steps": r.steps, "mean_completion_s": f["mean_completion_s"],
            "p95_completion_s": f["p95_completion_s"], "programs_completed": r.programs_completed,
            "unfinished": r.unfinished, "kv_hit_ratio": f["kv_hit_ratio"], "prompt_tokens": r.prompt_tokens,
            "cached_tokens": r.cached_tokens, "prefilled_tokens": r.prompt_tokens - r.cached_tokens,
            "recomputed_tokens": r.recomputed_tokens, "retractions": r.retractions, "pauses": r.pauses,
            "resumes": r.resumes, "retains": r.retains}


def ratios(rows: dict[str, dict]) -> dict[str, float | None]:
    """``program`` over the two baselines, by steps/min (and by p95 time: below 1 is better)."""
    out: dict[str, float | None] = {}
    for base in ("request", "thunderagent"):
        if "program" not in rows or base not in rows:
            continue
        b, p = rows[base]["steps_per_min"], rows["program"]["steps_per_min"]
        out[f"program/{base}"] = round(p / b, 3) if b else None
        bp, pp = rows[base]["p95_completion_s"], rows["program"]["p95_completion_s"]
        out[f"program/{base}_p95"] = round(pp / bp, 3) if bp and pp else None
    return out


def gap(measured: dict, predicted: dict) -> dict[str, float | None]:
    """Predicted over measured, minus one, per ratio and per policy's steps/min."""
    out: dict[str, float | None] = {}
    for k, m in ratios(measured).items():
        p = ratios(predicted).get(k)
        out[k] = round(p / m - 1, 3) if m and p is not None else None
    for pol in measured:
        m, p = measured[pol]["steps_per_min"], predicted.get(pol, {}).get("steps_per_min")
        out[f"{pol}_steps_per_min"] = round(p / m - 1, 3) if m and p is not None else None
    return out


# ---- main -------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short calibration and windows: < 10 min in all")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout (logs on stderr)")
    ap.add_argument("--port", type=int, default=30123)
    ap.add_argument("--programs", type=int, default=12, help="parallel programs (closed loop)")
    ap.add_argument("--kv-tokens", type=int, default=2048, help="the server's --max-total-tokens")
    ap.add_argument("--family", default="coding", choices=sorted(FAMILIES))
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--window", type=float, help="wall seconds per policy (default 120, quick 70)")
    ap.add_argument("--finish", type=float, help="seconds for started programs to finish (default 90, quick 40)")
    ap.add_argument("--max-turns", type=int, help="turns per program at most (default 6, quick 4)")
    ap.add_argument("--threads", type=int, default=1, help="the server's OMP_NUM_THREADS (0: torch's default)")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--ta-options", type=json.loads, default={},
                    help='thunderagent options as JSON, e.g. \'{"acting_decay": false}\' (default: the paper setting)')
    ap.add_argument("--program-options", type=json.loads, default={},
                    help='program options as JSON, e.g. \'{"keep_rule": "mean"}\' (default: its defaults)')
    args = ap.parse_args()
    if args.programs < 1 or args.kv_tokens < 256:
        ap.error("--programs must be at least 1 and --kv-tokens at least 256")
    window = args.window or (70.0 if args.quick else 120.0)
    finish = args.finish or (40.0 if args.quick else 90.0)
    scale = Scale(max_turns=args.max_turns or (4 if args.quick else 6))
    family = ScaledFamily(FAMILIES[args.family], scale)
    spread = 10.0
    max_tokens = scale.output_bounds[1]
    options = {p: {"thunderagent": args.ta_options, "program": args.program_options}.get(p, {}) for p in args.policies}

    def stop_on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_term)
    t0 = time.perf_counter()
    sample = [family.program(args.seed, i) for i in range(args.programs)]
    contexts = [family.system_tokens + t.task_tokens + sum(u.output_tokens + u.result_tokens for u in t.turns)
                for t in sample]
    log(f"{args.family} scaled: system {family.system_tokens} tokens, final contexts of the first {args.programs} "
        f"programs {min(contexts)}-{max(contexts)} (sum {sum(contexts)}) against a KV pool of {args.kv_tokens}")
    server = Server(args.port, args.kv_tokens, args.threads or None)
    measured: dict[str, dict] = {}
    try:
        server.ensure(policy_flags(args.policies[0]))
        info = server.info()
        prefill, decode = asyncio.run(measure(server.url, args.quick, args.seed))
        internal = (info.get("internal_states") or [{}])[0]
        fitted = fit_cost_model(
            prefill, decode, name="fitted", kv_capacity_tokens=int(info["max_total_num_tokens"]),
            max_running_requests=int(internal.get("effective_max_running_requests_per_dp")
                                     or info.get("max_running_requests") or 64),
            chunked_prefill_size=int(info.get("chunked_prefill_size") or 8192),
            context_length=int(info.get("context_length") or 8192))
        log(f"fitted: prefill {fitted.prefill_overhead_s * 1000:.1f} ms + {fitted.prefill_per_token_s * 1000:.3f} "
            f"ms/token + {fitted.prefill_attn_per_pair_s * 1e9:.2f} ns/pair; decode {fitted.decode_base_s * 1000:.1f} "
            f"ms + {fitted.decode_per_seq_s * 1000:.2f} ms/seq + {fitted.decode_per_context_token_s * 1e6:.2f} "
            f"us/context token; KV {fitted.kv_capacity_tokens}, max running {fitted.max_running_requests}")
        for i, policy in enumerate(args.policies):
            if i > 0:
                server.ensure(policy_flags(policy))
            log(f"{policy}: real run, {args.programs} programs, {window:.0f} s window")
            log_path = server_log_path(args.port)
            offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
            measured[policy] = asyncio.run(run_real(
                policy, server.url, family, programs=args.programs, seed=args.seed, window_s=window, finish_s=finish,
                start_spread_s=spread, max_tokens=max_tokens, prefill_s_per_token=fitted.recompute_s_per_token(),
                policy_options=options[policy]))
            if os.path.exists(log_path):
                with open(log_path, errors="replace") as f:
                    f.seek(offset)
                    measured[policy]["in_run_decode"] = in_run_decode(f.read().splitlines(), fitted)
            log(f"{policy}: {json.dumps(measured[policy])}")
    finally:
        server.stop()
    predicted = {}
    for policy in args.policies:
        predicted[policy] = run_sim(policy, family, fitted, programs=args.programs, seed=args.seed, window_s=window,
                                    finish_s=finish, start_spread_s=spread, max_tokens=max_tokens,
                                    policy_options=options[policy])
        log(f"{policy}: predicted {json.dumps(predicted[policy])}")
    preset_cost = preset("smollm2-135m-cpu")
    out = {
        "config": {"family": args.family, "seed": args.seed, "programs": args.programs, "kv_tokens": args.kv_tokens,
                   "window_s": window, "finish_s": finish, "start_spread_s": spread, "scale": asdict(scale),
                   "system_tokens": family.system_tokens, "final_context_tokens_first_programs": contexts,
                   "ta_options": args.ta_options, "program_options": args.program_options,
                   "server_flags": {p: policy_flags(p) for p in args.policies},
                   "quick": args.quick, "server_omp_threads": args.threads or None},
        "calibration": {
            "prefill": [asdict(p) for p in prefill], "decode": [asdict(d) for d in decode],
            "fitted": asdict(fitted), "fitted_error": model_error(fitted, prefill, decode),
            "preset": asdict(preset_cost), "preset_error": model_error(preset_cost, prefill, decode),
        },
        "measured": measured,
        "predicted": predicted,
        "ratios": {"measured": ratios(measured), "predicted": ratios(predicted)},
        "gap_predicted_over_measured_minus_1": gap(measured, predicted),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if args.json:
        print(json.dumps(out))
        return
    print(f"{'policy':>13} {'steps/min':>18} {'KV hit':>15} {'recomputed':>19} {'p95 s':>15}")
    for p in args.policies:
        m, s = measured[p], predicted[p]
        print(f"{p:>13} {m['steps_per_min']:>8.1f} / {s['steps_per_min']:<7.1f} {m['kv_hit_ratio']:>6.3f} / "
              f"{s['kv_hit_ratio']:<6.3f} {m['recomputed_tokens']:>8} / {s['recomputed_tokens']:<8} "
              f"{m['p95_completion_s'] or math.nan:>6.1f} / {s['p95_completion_s'] or math.nan:<6.1f}")
    print("(measured / predicted)")
    print(f"ratios measured {ratios(measured)}\nratios predicted {ratios(predicted)}")
    print(f"gap {out['gap_predicted_over_measured_minus_1']}\nwall {out['wall_s']} s")


if __name__ == "__main__":
    main()

"""The ``evolve`` workflow: Squeeze-Evolve on the service's backends, one checkpoint per loop.

Every model call goes through the scheduler runtime. The programs of a run are one per
(problem, model) — ``{run_id}:{problem}:{model}``, each a ``ProgramSession`` (no sandbox; the
session's retry policy) — declaring the problem's question as their
shared prefix, so a problem's population is a family of programs the scheduler keeps together
on each backend. Loop t is step ``loop-t``: its output (the populations, the routing, the
ledger) is the checkpoint, so a run that crashed resumes at the loop it was in and finished
loops are never called again. An ``evolve.loop`` event follows each loop.
"""

from __future__ import annotations

import asyncio
import hashlib
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any
from collections.abc import Awaitable, Callable

from evolve.engine import Evolution
from evolve.ledger import Ledger
from evolve.operators import Messages, Operators, default_operators
from evolve.spec import EvolveInput, ModelSpec, input_model
from evolve.templates import render
from orchestrator.runs.context import RunContext
from scheduler.backends.base import GenerateRequest, Generation
from scheduler.runtime import ProgramRuntime, estimate_tokens
from scheduler.session import ProgramSession

if TYPE_CHECKING:
    from orchestrator.metrics import Metrics
    from orchestrator.workflows.registry import WorkflowRegistry


class RuntimeCalls:
    """``evolve.engine.Calls`` through the scheduler runtime, at most ``max_concurrency`` in flight:
    one ``ProgramSession`` per (problem, model), opened on its first call and closed by ``close``."""

    def __init__(self, runtime: ProgramRuntime, run_id: str, tenant: str, spec: EvolveInput) -> None:
        self.runtime = runtime
        self.run_id = run_id
        self.tenant = tenant
        self.sem = asyncio.Semaphore(spec.max_concurrency)
        self.sessions: dict[str, ProgramSession] = {}
        self._programs = AsyncExitStack()
        self._prefix = []
        for p in spec.problems:
            key = "evolve:" + hashlib.sha256(p.question.encode()).hexdigest()[:16]
            self._prefix.append((key, estimate_tokens(GenerateRequest(prompt=p.question))))

    def _sampling(self, model: ModelSpec) -> dict[str, Any]:
        return {"model": model.model, "max_tokens": model.max_tokens, "temperature": model.temperature,
                "top_p": model.top_p, "extra_body": dict(model.extra_body)}

    async def generate(self, model: ModelSpec, problem: int, messages: Messages, seed: int) -> Generation:
        if model.endpoint == "chat":
            request = GenerateRequest(messages=messages, seed=seed, **self._sampling(model))
        else:
            request = GenerateRequest(prompt=self.render(model, messages), seed=seed, **self._sampling(model))
        return await self._call(model, problem, request)

    async def score(self, model: ModelSpec, problem: int, prompt: str, top_k: int, start: int = 0) -> Generation:
        """Prefill-only: one generated token, prompt logprobs from token ``start`` on (SGLang's
        ``logprob_start_len``; a backend that ignores it returns them all, which is also right)."""
        extra = dict(model.extra_body) | ({"logprob_start_len": start} if start else {})
        request = GenerateRequest(prompt=prompt, model=model.model, max_tokens=1, temperature=0.0,
                                  prompt_logprobs=True, prompt_top_logprobs=top_k, extra_body=extra)
        return await self._call(model, problem, request)

    async def count(self, model: ModelSpec, problem: int, prompt: str) -> Generation:
        """The prompt's length in the model's tokens (and its KV warmed for the passes that follow)."""
        request = GenerateRequest(prompt=prompt, model=model.model, max_tokens=1, temperature=0.0,
                                  extra_body=dict(model.extra_body))
        return await self._call(model, problem, request)

    def render(self, model: ModelSpec, messages: Messages) -> str:
        return render(model.chat_template, messages, self.runtime.backends.get(model.backend_name))

    async def _session(self, model: ModelSpec, problem: int) -> ProgramSession:
        program = f"{self.run_id}:{problem}:{model.name}"
        session = self.sessions.get(program)
        if session is None:
            key, tokens = self._prefix[problem]
            session = self.sessions[program] = ProgramSession(
                self.runtime, program, self.tenant, backends=(model.backend_name,), prefix_key=key,
                prefix_tokens=tokens)
            await self._programs.enter_async_context(session)
        return session

    async def _call(self, model: ModelSpec, problem: int, request: GenerateRequest) -> Generation:
        async with self.sem:
            return await (await self._session(model, problem)).generate(request)

    async def close(self) -> None:
        """Release every program the run opened."""
        await self._programs.aclose()
        self.sessions.clear()


def _loop_event(out: dict[str, Any], totals: Ledger) -> dict[str, Any]:
    return {"loop": out["loop"], "routes": out["routes"], "lite": out["lite"], "fitness": out["fitness"],
            "tokens_so_far": totals.tokens(), "cost_usd_so_far": round(totals.cost_usd, 9),
            "wall_s": round(out["wall_s"], 4), "model_busy_s": round(out["model_busy_s"], 4)}


def _count(metrics: Metrics | None, ledger: dict[str, Any]) -> None:
    """Per-model and per-tier counters; called by a step that actually ran (never on replay)."""
    if metrics is None:
        return
    for model, u in ledger["models"].items():
        for kind, n in (("input", u["input_tokens"]), ("output", u["output_tokens"] + u["scoring_output_tokens"]),
                        ("scoring", u["scoring_tokens"])):
            if n:
                metrics.evolve_tokens.labels(model, kind).inc(n)
        for kind, n in (("generate", u["calls"]), ("score", u["scoring_calls"])):
            if n:
                metrics.evolve_calls.labels(model, kind).inc(n)
        if u["cost_usd"]:
            metrics.evolve_cost.labels(model).inc(u["cost_usd"])
    for tier, n in ledger["tier_calls"].items():
        if n:
            metrics.evolve_routed.labels(tier).inc(n)


def make_workflow(ops: Operators) -> Callable[[RunContext, Any], Awaitable[dict[str, Any]]]:
    async def evolve(ctx: RunContext, inp: EvolveInput) -> dict[str, Any]:
        """Squeeze-Evolve: confidence-routed multi-model evolution with a final answer per problem."""
        runtime = ctx.runtime(m.backend_name for m in inp.models)
        metrics = ctx.services.metrics
        calls = RuntimeCalls(runtime, ctx.run_id, ctx.tenant, inp)
        evo = Evolution(inp, ops, calls)
        await ctx.emit("evolve.started", {
            "problems": len(inp.problems), "models": [m.name for m in evo.models], "population": inp.population,
            "k": inp.k, "groups": inp.group_count(), "loops": inp.loops, "fitness": inp.fitness,
            "percentiles": inp.boundaries(), "lite_fraction": inp.lite_fraction,
            "scorer": evo.scorer.name if evo.scorer and evo.routed else None})

        async def counted(coro: Any) -> dict[str, Any]:
            out = await coro
            _count(metrics, out["ledger"])
            if metrics is not None and out.get("loop", -1) >= 0:
                metrics.evolve_loops.inc()
            return out

        try:
            loops: list[dict[str, Any]] = []
            populations: list[Any] = []  # loop 0's, set before any later loop reads it
            out = await ctx.step("loop-0", lambda: counted(evo.initial()))
            for t in range(inp.loops):
                if t > 0:
                    out = await ctx.step(f"loop-{t}", lambda t=t, pops=populations: counted(evo.step(t, pops)))
                populations = out.pop("populations")
                loops.append(out)
                totals = Ledger.total(Ledger.from_dict(x["ledger"]) for x in loops)
                await ctx.emit("evolve.loop", _loop_event(out, totals))
            final = await ctx.step("final", lambda: counted(evo.final(populations)))
        finally:
            await calls.close()
        ledgers = [Ledger.from_dict(x["ledger"]) for x in loops]
        total = Ledger.total([*ledgers, Ledger.from_dict(final["ledger"])])
        answers = [a | {"population": pop} for a, pop in zip(final["answers"], populations, strict=False)]
        known = [a["correct"] for a in answers if "correct" in a]
        wall = sum(x["wall_s"] for x in loops) + final["wall_s"]
        busy = sum(x["model_busy_s"] for x in loops) + final["model_busy_s"]
        scoring = sum(x.get("scoring_busy_s", 0.0) for x in loops)  # absent in older checkpoints
        result = {
            "answer": answers[0]["answer"] if len(answers) == 1 else None,
            "answers": answers,
            "accuracy": sum(known) / len(known) if known else None,
            "loops": [{k: v for k, v in x.items() if k not in ("populations", "routing")} for x in loops],
            "ledger": {"loops": [x.to_dict() for x in ledgers], "final": final["ledger"], "total": total.to_dict()},
            "models": [m.name for m in evo.models],
            "timing": {"wall_s": wall, "model_busy_s": busy,
                       "overhead_ratio": max(0.0, wall - busy) / wall if wall > 0 else 0.0,
                       # wall time with a confidence pass in flight, and its share of the loops' time
                       "scoring_busy_s": scoring,
                       "scoring_ratio": scoring / wall if wall > 0 else 0.0},
        }
        if metrics is not None:
            metrics.evolve_runs.inc()
        await ctx.emit("evolve.finished", {"answer": result["answer"], "accuracy": result["accuracy"],
                                           "cost_usd": total.cost_usd, "tokens": total.tokens(),
                                           "lite": total.lite, "tier_calls": total.tier_calls})
        return result

    return evolve


def register(registry: WorkflowRegistry, ops: Operators | None = None, name: str = "evolve") -> None:
    """The ``orchestrator.workflows`` entry point (see pyproject.toml); ``ops`` and ``name`` register
    a variant with other operators."""
    ops = ops or default_operators()
    registry.workflow(name, input_model(ops))(make_workflow(ops))

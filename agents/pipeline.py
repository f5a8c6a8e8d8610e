"""The ``pipeline`` workflow: Mixture-of-Agents layers and an aggregator, ``wait`` or ``staircase``.

Each agent is its own scheduler program (``<run id>:p<layer>.<index>``, ``<run id>:agg``), so the
scheduler sees, places and can hold each one like any gateway program; each is a
``ProgramSession`` (no sandbox: pipeline agents run no tools), released when the run ends, however
it ends, and whose calls a failure before their first token sends again. The aggregator's tokens
reach the user as ``pipeline.delta`` events (batched, see ``delta_interval_s``) on the run's
stream, which the SDK's ``runs.stream`` yields.

Events written from concurrent agents cannot use ``RunContext.emit`` (its replay keys follow call
order), so they carry their own keys, unique per attempt: a resumed run does not re-send the
rounds it replays, and a round that was cut off by a crash and is run again says so with a new
``attempt`` on its deltas.
"""

from __future__ import annotations

import itertools
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any
from collections.abc import AsyncGenerator, Mapping

from agents.pipeline_exec import PipelineError, PipelineExecutor
from agents.pipeline_spec import Node, PipelineInput
from orchestrator.runs.context import RunContext, RunFailed
from scheduler.backends.base import Backend, GenerateRequest, GenerationChunk
from scheduler.session import ProgramSession

if TYPE_CHECKING:
    from orchestrator.workflows.registry import WorkflowRegistry


class RunEvents:
    """``Events`` on the run's log, keyed ``pipeline:<attempt>:<n>``."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self._n = itertools.count()

    async def _emit(self, type_: str, data: dict[str, Any]) -> None:
        key = f"pipeline:{self.ctx.attempt}:{next(self._n)}"
        await self.ctx.emit(type_, data, key=key)

    async def delta(self, round: int, text: str) -> None:
        await self._emit("pipeline.delta", {"round": round, "attempt": self.ctx.attempt, "text": text})

    async def agent(self, node: str, data: dict[str, Any]) -> None:
        await self._emit("pipeline.agent", {"agent": node, **data})

    async def round(self, data: dict[str, Any]) -> None:
        await self._emit("pipeline.round", {"attempt": self.ctx.attempt, **data})


async def pipeline(ctx: RunContext, inp: PipelineInput) -> dict[str, Any]:
    """Run proposer layers and an aggregator; the aggregator's tokens stream as ``pipeline.delta``."""
    runtime = ctx.runtime(inp.backends())
    inp = inp.model_copy(update={"continuation": continuation_for(inp, runtime.backends)})
    sessions = {n.id: ProgramSession(runtime, f"{ctx.run_id}:{n.id}", ctx.tenant,
                                     backends=(n.agent.backend,) if n.agent.backend else None)
                for n in inp.nodes()}

    def llm(node: Node, request: GenerateRequest) -> AsyncGenerator[GenerationChunk, None]:
        return sessions[node.id].stream(request)

    await ctx.emit("pipeline.started", {"mode": inp.mode, "continuation": inp.continuation,
                                        "layers": [len(layer.agents) for layer in inp.layers],
                                        "programs": {nid: s.program_id for nid, s in sessions.items()}})
    async with AsyncExitStack() as programs:
        for session in sessions.values():
            await programs.enter_async_context(session)  # each released however the run ends
        try:
            result = await PipelineExecutor(inp, llm, RunEvents(ctx), ctx.step).run()
        except PipelineError as exc:
            raise RunFailed(exc.code, exc.message) from None
    await ctx.emit("pipeline.finished", {k: result[k] for k in ("stop_reason", "rounds", "usage", "ttft_s",
                                                                "elapsed_s")})
    return {**result, "continuation": inp.continuation}


def continuation_for(inp: PipelineInput, backends: Mapping[str, Backend]) -> str:
    """``auto`` resolved: ``prefix`` when every backend an aggregating agent may run on (the one
    it names, else any) honours ``continue_final_message``, else ``turn``. Why not always
    ``prefix``: it is what keeps staircase answers at wait's quality on a small model (11 of 12
    against 9 of 12 with ``turn``, docs/pipelines.md), but an endpoint that does not know the
    parameter may refuse the call or close the turn."""
    if inp.continuation != "auto":
        return inp.continuation
    names = set()
    for node in inp.nodes():
        if node.aggregates:
            names |= {node.agent.backend} if node.agent.backend else set(backends)
    return "prefix" if names and all(backends[n].continues_final_message for n in names) else "turn"


def register(registry: WorkflowRegistry) -> None:
    """The ``orchestrator.workflows`` entry point (see pyproject.toml)."""
    registry.workflow("pipeline", PipelineInput)(pipeline)

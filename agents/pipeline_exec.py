"""Running a pipeline: ``wait`` (each layer after the previous one) and ``staircase`` (early start).

Both executors are independent of the service: they get an ``LLM`` (one streamed call of one
agent), a ``Step`` (a checkpoint: on a replay it returns the stored output instead of running)
and ``Events`` (where the user's tokens and progress go), so the workflow, the tests and the
benchmark run the same code.

Checkpoints: ``wait`` checkpoints each layer and the aggregation. ``staircase`` checkpoints each
round of the final aggregator: what it was given, what it wrote, and the full outputs of the
agents that had ended by then. A resumed run replays those rounds without calling anyone, re-uses
the ended agents' outputs, restarts the agents that were still streaming, and goes on from the
chunks the aggregator had not consumed yet. The aggregator is never restarted: it appends.

Failures: a proposer that fails or stalls (sends nothing for ``stall_timeout_s``) ends there; what
it had sent is kept and the others go on. Only when every input of an aggregating agent ended
without a word, or the final aggregator itself fails, does the pipeline fail.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol
from collections.abc import AsyncGenerator, Awaitable, Callable

from agents.pipeline_chunks import ChunkCutter, RoundPlan, RoundPlanner, Upstream
from agents.pipeline_prompts import Conversation, RestartGuard, proposer_messages
from agents.pipeline_spec import Node, PipelineInput
from scheduler.backends.base import GenerateRequest, GenerationChunk

log = logging.getLogger("agents.pipeline")

LLM = Callable[[Node, GenerateRequest], AsyncGenerator[GenerationChunk, None]]
Step = Callable[..., Awaitable[Any]]


class Events(Protocol):
    async def delta(self, round: int, text: str) -> None: ...
    async def agent(self, node: str, data: dict[str, Any]) -> None: ...
    async def round(self, data: dict[str, Any]) -> None: ...


class PipelineError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def run_now(_name: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """A ``Step`` without checkpoints (benchmarks, unit tests)."""
    return await fn(*args)


@dataclass
class Outcome:
    """One streamed call, however it ended."""

    text: str
    status: str  # finished | failed | stalled
    finish: str | None = None
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0,
                                                           "cached_tokens": 0})
    error: str | None = None
    dropped: int = 0  # characters a RestartGuard dropped (an aggregating agent's round)


async def stream_call(llm: LLM, node: Node, request: GenerateRequest, stall_s: float,
                      on_text: Callable[[str], Awaitable[None]]) -> Outcome:
    """Stream one call; a gap longer than ``stall_s`` between two deltas ends it as stalled (the
    call is closed, which aborts it on the engine). A failure (after the program session's
    retries, see ``scheduler.session``) ends it as failed, keeping what it had sent."""
    parts: list[str] = []
    gen = llm(node, request)
    try:
        while True:
            try:
                async with asyncio.timeout(stall_s):
                    chunk = await anext(gen)
            except StopAsyncIteration:
                return Outcome("".join(parts), "failed", error="stream ended without a final chunk")
            except TimeoutError:
                return Outcome("".join(parts), "stalled", error=f"nothing for {stall_s:g} s")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed call, no backend, a bad request: this agent's failure
                return Outcome("".join(parts), "failed", error=f"{type(exc).__name__}: {exc}")
            if chunk.text:
                parts.append(chunk.text)
                await on_text(chunk.text)  # its errors (a lost lease...) are the caller's, not the agent's
            if chunk.finish_reason is not None:
                u = chunk.usage
                usage = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                         "cached_tokens": u.cached_tokens} if u else Outcome("", "").usage
                if chunk.finish_reason in ("abort", "error"):
                    return Outcome("".join(parts), "failed", chunk.finish_reason, usage,
                                   f"finish {chunk.finish_reason}")
                return Outcome("".join(parts), "finished", chunk.finish_reason, usage)
    finally:
        await gen.aclose()


def answered(finish: str | None) -> bool:
    """Whether an aggregating agent's round ended its answer: the model wrote its end of turn (or a
    stop string) rather than being cut at the round's token budget. Its answer is then final, even
    in a round that is not the last: asking it to "continue" a finished answer makes it restart
    (SmolLM2 at temperature 0 wrote "The capital of France is Paris." twice) or say that it has
    already answered, so no round follows, and what arrives later is not read."""
    return finish is not None and finish != "length"


def request_for(node: Node, messages: list[dict[str, Any]], max_tokens: int,
                continues: bool = False) -> GenerateRequest:
    """One call of ``node``; ``continues``: the last message is the agent's own open assistant turn,
    which the engine is to continue rather than close (SGLang's and vLLM's ``continue_final_message``)."""
    a = node.agent
    return GenerateRequest(messages=messages, model=a.model, max_tokens=max(1, max_tokens), temperature=a.temperature,
                           top_p=a.top_p, seed=a.seed,
                           extra_body={"continue_final_message": True} if continues else {})


class _Output:
    """A non-final agent's output as the next layer sees it: chunks, and whether it ended."""

    def __init__(self, cutter: ChunkCutter) -> None:
        self.cutter = cutter
        self.up = Upstream(cutter.chunks)
        self.listeners: list[asyncio.Event] = []
        self.status = "running"

    def feed(self, text: str) -> None:
        if self.cutter.feed(text):
            self._notify()

    def end(self, status: str) -> None:
        self.cutter.finish()
        self.up.ended = True
        self.status = status
        self._notify()

    def _notify(self) -> None:
        for ev in self.listeners:
            ev.set()


class _Batcher:
    """The final aggregator's tokens, one event per ``interval`` (an event log is not a socket)."""

    def __init__(self, events: Events, interval: float, round_: int, clock: Callable[[], float]) -> None:
        self.events, self.interval, self.round, self.clock = events, interval, round_, clock
        self.buf: list[str] = []
        self.last = clock()

    async def add(self, text: str) -> None:
        self.buf.append(text)
        if self.clock() - self.last >= self.interval:
            await self.flush()

    async def flush(self) -> None:
        if self.buf:
            text, self.buf = "".join(self.buf), []
            await self.events.delta(self.round, text)
        self.last = self.clock()


class PipelineExecutor:
    def __init__(self, spec: PipelineInput, llm: LLM, events: Events, step: Step = run_now, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.llm = llm
        self.events = events
        self.step = step
        self.clock = clock
        nodes = spec.nodes()
        self.final = nodes[-1]
        self.layers: list[list[Node]] = [[n for n in nodes if n.layer == li] for li in range(len(spec.layers))]
        self.usage: dict[str, dict[str, int]] = {n.id: {"prompt_tokens": 0, "completion_tokens": 0,
                                                        "cached_tokens": 0, "requests": 0} for n in nodes}
        self.status: dict[str, str] = {n.id: "pending" for n in nodes}
        self.started = clock()
        self.first_token_at: float | None = None
        self.streamed: list[str] = []  # the final aggregator's text this attempt, as it came
        self.rounds = 0
        self._conv: Conversation | None = None  # staircase: the aggregator's conversation
        self._partial: list[str] = []  # ...and the text of its round in progress
        # staircase
        self._outputs: dict[str, _Output] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._ended: dict[str, dict[str, Any]] = {}  # node id -> {"status", "text"} once its output ended
        self._recorded: set[str] = set()
        self._wake = asyncio.Event()

    # ---- entry -------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        answer: str | None = None
        reason = "finished"
        try:
            async with asyncio.timeout(self.spec.time_budget_s):
                answer, reason = await (self._wait() if self.spec.mode == "wait" else self._staircase())
        except TimeoutError:
            written = self._conv.text + "".join(self._partial) if self._conv is not None else "".join(self.streamed)
            answer, reason = written, "time_budget"
        finally:
            await self._stop_graph()
        total = {k: sum(u[k] for u in self.usage.values()) for k in ("prompt_tokens", "completion_tokens",
                                                                       "cached_tokens", "requests")}
        return {"answer": answer, "mode": self.spec.mode, "stop_reason": reason, "rounds": self.rounds,
                "agents": {nid: {"status": self.status[nid], **u} for nid, u in self.usage.items()},
                "usage": total, "aggregator_usage": dict(self.usage[self.final.id]),
                "ttft_s": None if self.first_token_at is None else round(self.first_token_at - self.started, 4),
                "elapsed_s": round(self.clock() - self.started, 4)}

    def _count(self, node: Node, usage: dict[str, int]) -> None:
        u = self.usage[node.id]
        for k in ("prompt_tokens", "completion_tokens", "cached_tokens"):
            u[k] += usage.get(k, 0)
        u["requests"] += 1

    async def _final_text(self, text: str) -> None:
        if self.first_token_at is None:
            self.first_token_at = self.clock()
        self.streamed.append(text)
        self._partial.append(text)

    # ---- wait --------------------------------------------------------------------------------

    async def _wait(self) -> tuple[str, str]:
        inputs: list[str] | None = None
        for li, nodes in enumerate(self.layers):
            outs = await self.step(f"layer-{li}", self._wait_layer, li, inputs)
            for node, out in zip(nodes, outs, strict=False):
                self.status[node.id] = out["status"]
                self._count(node, out["usage"])
            if not any(o["text"] for o in outs):
                raise PipelineError("proposers_failed", f"Every agent of layer {li} failed: "
                                    + "; ".join(f"{n.id}: {o['error']}" for n, o in zip(nodes, outs, strict=False)))
            inputs = [o["text"] for o in outs]
        out = await self.step("aggregate", self._wait_aggregate, inputs)
        self.status[self.final.id] = "finished"
        self._count(self.final, out["usage"])
        self.rounds = 1
        return out["text"], "max_tokens" if out["finish"] == "length" else "finished"

    async def _wait_layer(self, li: int, inputs: list[str] | None) -> list[dict[str, Any]]:
        async def one(node: Node) -> dict[str, Any]:
            if inputs is None:
                messages = proposer_messages(self.spec.task, node.agent.system_prompt)
            else:
                conv = Conversation(self.spec.task, node.agent.system_prompt or "", len(inputs))
                conv.add_round(inputs, [True] * len(inputs))
                messages = conv.messages()
            o = await stream_call(self.llm, node, request_for(node, messages, node.agent.max_tokens),
                                  self.spec.stall_timeout_s, _ignore)
            await self._agent_event(node, o)
            return {"text": o.text, "status": o.status, "usage": o.usage, "error": o.error}

        return list(await asyncio.gather(*(one(n) for n in self.layers[li])))

    async def _wait_aggregate(self, inputs: list[str]) -> dict[str, Any]:
        node = self.final
        conv = Conversation(self.spec.task, node.agent.system_prompt or "", len(inputs))
        conv.add_round(inputs, [True] * len(inputs))
        batch = _Batcher(self.events, self.spec.delta_interval_s, 0, self.clock)

        async def on_text(text: str) -> None:
            await self._final_text(text)
            await batch.add(text)

        o = await stream_call(self.llm, node, request_for(node, conv.messages(), node.agent.max_tokens),
                              self.spec.stall_timeout_s, on_text)
        await batch.flush()
        if o.status != "finished":
            raise PipelineError("aggregator_failed", f"The aggregator {o.status}: {o.error}")
        await self.events.round({"round": 0, "final": True, "finish": o.finish, **o.usage})
        return {"text": o.text, "finish": o.finish, "usage": o.usage}

    async def _agent_event(self, node: Node, o: Outcome) -> None:
        await self.events.agent(node.id, {"layer": node.layer, "status": o.status, "error": o.error,
                                          "chars": len(o.text), **o.usage})

    # ---- staircase ---------------------------------------------------------------------------

    async def _staircase(self) -> tuple[str, str]:
        node = self.final
        inputs = len(self.layers[-1])
        conv = self._conv = Conversation(self.spec.task, node.agent.system_prompt or "", inputs,
                                         prefix=self.spec.continuation == "prefix")
        planner = RoundPlanner(inputs)
        restored: dict[str, dict[str, Any]] = {}
        produced = 0
        r = 0
        while True:
            live: list[bool] = []
            rec = await self.step(f"round-{r}", self._live_round, r, conv, planner, restored, live)
            if not live:  # replayed from its checkpoint: rebuild the state it left
                conv.add_round(rec["parts"], rec["complete"]).output = rec["output"]
                planner.commit(RoundPlan(rec["parts"], rec["complete"], rec["taken"], rec["final"]))
                restored.update(rec["ended"])
            self._count(node, rec["usage"])
            produced += rec["usage"]["completion_tokens"]
            r += 1
            self.rounds = r
            if rec["final"] or produced >= node.agent.max_tokens or answered(rec["finish"]):
                self.status[node.id] = "finished"
                return conv.text, "max_tokens" if rec["finish"] == "length" else "finished"

    async def _live_round(self, r: int, conv: Conversation, planner: RoundPlanner,
                          restored: dict[str, dict[str, Any]], live: list[bool]) -> dict[str, Any]:
        live.append(True)
        node = self.final
        ups = self._ensure_graph(restored)
        batch = _Batcher(self.events, self.spec.delta_interval_s, r, self.clock)

        async def on_text(text: str) -> None:
            await self._final_text(text)
            await batch.add(text)

        produced = self.usage[node.id]["completion_tokens"]  # the rounds before this one
        plan, o = await self._aggregate_round(node, conv, planner, ups, self._wake, r, produced, on_text)
        await batch.flush()
        if o.status != "finished":
            raise PipelineError("aggregator_failed", f"The aggregator {o.status} in round {r}: {o.error}")
        ended = {nid: v for nid, v in self._ended.items() if nid not in self._recorded}
        self._recorded.update(ended)
        await self.events.round({"round": r, "final": plan.final, "finish": o.finish, "taken": plan.taken,
                                 "new_chars": [len(p) for p in plan.parts], "restart_chars": o.dropped,
                                 **o.usage})
        return {"round": r, "parts": plan.parts, "complete": plan.complete, "taken": plan.taken, "final": plan.final,
                "output": o.text, "finish": o.finish, "usage": o.usage, "ended": ended}

    async def _aggregate_round(self, node: Node, conv: Conversation, planner: RoundPlanner, ups: list[_Output],
                               wake: asyncio.Event, r: int, produced: int,
                               on_text: Callable[[str], Awaitable[None]]) -> tuple[RoundPlan, Outcome]:
        """Wait until a round is ready, extend the conversation with it, and write its output."""
        while (plan := planner.plan([u.up for u in ups])) is None:
            await wake.wait()
            wake.clear()
        if r == 0 and plan.final and not any(plan.parts):
            raise PipelineError("proposers_failed", f"Every input of {node.id} ended without output: "
                                + "; ".join(f"{nid}: {v['status']}" for nid, v in self._ended.items()))
        planner.commit(plan)
        guard = RestartGuard([x.output for x in conv.rounds])
        current = conv.add_round(plan.parts, plan.complete)
        left = node.agent.max_tokens - produced
        max_tokens = left if plan.final else min(left, self.spec.round_tokens(r))

        async def shown(text: str) -> None:
            if kept := guard.feed(text):
                await on_text(kept)

        o = await stream_call(self.llm, node, request_for(node, conv.messages(), max_tokens, conv.continues),
                              self.spec.stall_timeout_s, shown)
        if rest := guard.finish():
            await on_text(rest)
        # the round's output is what the user reads: the next round's prompt and the answer hold it
        o.text, o.dropped = guard.text, guard.dropped
        current.output = o.text
        self._partial = []
        return plan, o

    def _ensure_graph(self, restored: dict[str, dict[str, Any]]) -> list[_Output]:
        """Start the agents (on the first round this attempt runs): ended ones from their checkpoint,
        and none whose readers all ended already (after a resume)."""
        if not self._outputs:
            last = len(self.layers) - 1
            for li, nodes in enumerate(self.layers):
                needed = li == last or any(n.id not in restored for n in self.layers[li + 1])
                wake = asyncio.Event()
                ups = [self._outputs[n.id] for n in self.layers[li - 1]] if li else []
                for u in ups:
                    u.listeners.append(wake)
                for n in nodes:
                    out = self._outputs[n.id] = _Output(ChunkCutter(self.spec.chunk_size))
                    if n.id in restored:
                        out.feed(restored[n.id]["text"])
                        out.end(restored[n.id]["status"])
                        self.status[n.id] = restored[n.id]["status"]
                        self._recorded.add(n.id)
                        continue
                    if not needed:
                        out.end("skipped")
                        self.status[n.id] = "skipped"
                        continue
                    coro = self._propose(n, out) if li == 0 else self._aggregate_mid(n, ups, out, wake)
                    self._tasks.append(asyncio.create_task(coro, name=f"pipeline-{n.id}"))
            for n in self.layers[-1]:
                self._outputs[n.id].listeners.append(self._wake)
        return [self._outputs[n.id] for n in self.layers[-1]]

    async def _end(self, node: Node, out: _Output, o: Outcome) -> None:
        out.end(o.status)
        self.status[node.id] = o.status
        self._ended[node.id] = {"status": o.status, "text": out.cutter.text}
        await self._agent_event(node, o)

    async def _propose(self, node: Node, out: _Output) -> None:
        self.status[node.id] = "running"

        async def on_text(text: str) -> None:
            out.feed(text)

        o = await stream_call(self.llm, node, request_for(
            node, proposer_messages(self.spec.task, node.agent.system_prompt), node.agent.max_tokens),
            self.spec.stall_timeout_s, on_text)
        self._count(node, o.usage)
        await self._end(node, out, o)

    async def _aggregate_mid(self, node: Node, ups: list[_Output], out: _Output, wake: asyncio.Event) -> None:
        """A proposer of layer 2+: a staircase aggregator of the layer before, streaming to the next."""
        self.status[node.id] = "running"
        conv = Conversation(self.spec.task, node.agent.system_prompt or "", len(ups),
                            prefix=self.spec.continuation == "prefix")
        planner = RoundPlanner(len(ups))
        produced, r = 0, 0

        async def on_text(text: str) -> None:
            out.feed(text)

        o = Outcome("", "finished")
        try:
            while True:
                plan, o = await self._aggregate_round(node, conv, planner, ups, wake, r, produced, on_text)
                self._count(node, o.usage)
                produced += o.usage["completion_tokens"]
                r += 1
                if o.status != "finished" or plan.final or produced >= node.agent.max_tokens or answered(o.finish):
                    break
        except PipelineError as exc:
            o = Outcome("", "failed", error=exc.message)
        await self._end(node, out, Outcome(conv.text, o.status, o.finish, dict(self.usage[node.id]), o.error))

    async def _stop_graph(self) -> None:
        """Cancel agents still streaming (their calls are aborted on the engines) and wait for them."""
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)
        for t in self._tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                log.warning("pipeline agent task failed: %r", t.exception())
        self._tasks = []


async def _ignore(_text: str) -> None:
    return None

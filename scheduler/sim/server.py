"""An SGLang-compatible HTTP server in front of one ``SimEngine`` running in real time.

Why: end-to-end tests and demos of the control plane need an engine that behaves like SGLang
on the wire (same endpoints and field names, cumulative ``text`` on ``/generate`` streams,
``cached_tokens``, ``/abort_request``, ``/v1/loads``, ``/metrics``) and in time (queueing,
prefill, decode, eviction), without a GPU. ``--speed 10`` runs simulated time 10x faster than
wall time. Field names follow ../shared/sglang-cpu/README.md (measured on SGLang 0.5.23).

    python -m scheduler.sim.server --port 30000 --preset llama-3.1-8b-h100 --speed 10
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from scheduler.backends import openai_wire as wire
from scheduler.backends.base import Generation, GenerationChunk, TokenLogprob, Usage
from scheduler.sim.clock import RealTimeClock
from scheduler.sim.cost import PRESETS, preset
from scheduler.sim.engine import EngineConfig, SimEngine, SimRequest
from scheduler.sim.script import (
    AgentTraceScript,
    ChunkedScript,
    PseudoScript,
    Script,
    Turn,
    hashed_prompt_logprobs,
    problem_script,
)
from scheduler.sim.tokenizer import SimTokenizer, render_chat


class _Live:
    """Bridges engine callbacks (on the event loop) to one HTTP response."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()

    def notify(self, _req: SimRequest) -> None:
        self.changed.set()

    async def updates(self, req: SimRequest) -> AsyncIterator[None]:
        """Yields whenever new tokens arrived or the request finished."""
        while True:
            await self.changed.wait()
            self.changed.clear()
            yield
            if req.finish_reason is not None:
                return


@dataclasses.dataclass(frozen=True)
class Faults:
    """Scripted misbehaviour of every streamed response, for tests of callers that must survive it:
    after ``stall_after_tokens`` tokens the stream sends nothing for ``stall_seconds`` (wall time;
    the engine goes on, as when a network path or a proxy stalls); after ``fail_after_tokens``
    tokens the connection is dropped mid-response (the request is aborted on the engine)."""

    stall_after_tokens: int | None = None
    stall_seconds: float = 3600.0
    fail_after_tokens: int | None = None

    def limit(self, sent: int, n: int, stalled: bool) -> int:
        """How many of ``n`` generated tokens may go out now."""
        for at in (None if stalled else self.stall_after_tokens, self.fail_after_tokens):
            if at is not None and sent <= at < n:
                n = at
        return n

    async def after(self, sent: int, stalled: bool) -> bool:
        """Called once ``sent`` tokens went out: stalls or fails here if scripted; returns ``stalled``."""
        if self.fail_after_tokens is not None and sent >= self.fail_after_tokens:
            raise ConnectionAbortedError(f"scripted failure after {sent} tokens")
        if not stalled and self.stall_after_tokens is not None and sent >= self.stall_after_tokens:
            await asyncio.sleep(self.stall_seconds)
            return True
        return stalled


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": "invalid_request_error", "code": status, "message": message, "param": None}},
                        status_code=status)


def create_app(config: EngineConfig, script: Script | None = None, speed: float = 1.0,
               model_name: str = "sim-model", faults: Faults | None = None) -> FastAPI:
    """The app; the engine starts with the app's lifespan (it needs the running loop)."""
    faults = faults or Faults()
    tokenizer = SimTokenizer()
    state: dict[str, SimEngine] = {}
    config = dataclasses.replace(config, max_macro_steps=1)  # stream every decode step

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state["engine"] = SimEngine(RealTimeClock(speed), config, script=script or PseudoScript(), name=model_name)
        yield

    app = FastAPI(title="SGLang simulator", lifespan=lifespan)

    def engine() -> SimEngine:
        return state["engine"]

    def submit(body: dict[str, Any], input_ids: list[int], max_new_tokens: int,
               **extra: Any) -> tuple[SimRequest, _Live]:
        live = _Live()
        req = SimRequest(
            rid=str(body.get("rid") or uuid.uuid4().hex), input_ids=input_ids,
            max_new_tokens=max(1, int(max_new_tokens)),
            priority=int(body.get("priority") or 0), on_tokens=live.notify, on_finish=live.notify, **extra)
        engine().submit(req)
        return req, live

    def finish_type(req: SimRequest) -> dict[str, Any] | None:
        if req.finish_reason is None:
            return None
        if req.finish_reason == "abort":
            return {"type": "abort", "message": "Aborted"}
        if req.finish_reason == "length":
            return {"type": "length", "length": req.generated}
        return {"type": "stop", "matched": None}

    def check_input(n: int) -> JSONResponse | None:
        e = engine()
        limit = min(e.capacity, e.cost.context_length) - 1
        if n > limit:
            return _error(400, f"The input ({n} tokens) is longer than the model's context length ({limit} tokens).")
        return None

    # ---- /generate ----------------------------------------------------------------------

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        body = await request.json()
        sp = body.get("sampling_params") or {}
        input_ids = body.get("input_ids")
        text = None if input_ids is not None else str(body.get("text") or "")
        if input_ids is None:
            input_ids = tokenizer.encode(text or "")
        if (bad := check_input(len(input_ids))) is not None:
            return bad
        if body.get("rid") and engine().is_live(str(body["rid"])):
            return _error(400, f"duplicate rid {body['rid']}")
        req, live = submit(body, list(input_ids), sp.get("max_new_tokens", 128), ignore_eos=bool(sp.get("ignore_eos")),
                           logprobs=bool(body.get("return_logprob")),
                           top_logprobs=int(body.get("top_logprobs_num") or 0),
                           seed=sp.get("sampling_seed", sp.get("seed")), prompt_text=text)
        start = body.get("logprob_start_len", -1)
        prompt_logprobs = bool(body.get("return_logprob")) and start is not None and int(start) >= 0
        t0 = time.monotonic()

        def input_logprobs() -> tuple[list[Any], list[Any]]:
            """SGLang's ``input_token_logprobs`` / ``input_top_logprobs`` from ``logprob_start_len``
            on (the first prompt token has none): scripted when the script scripts them."""
            pieces = tokenizer.split(text) if text is not None else [tokenizer.decode([i]) for i in input_ids]
            k = int(body.get("top_logprobs_num") or 0)
            scripted = getattr(engine().script, "prompt_logprobs", None)
            rows = scripted(pieces, k) if scripted else hashed_prompt_logprobs(pieces, k)
            first = max(1, int(start))  # row i is prompt token i + 1; the first token has no logprob
            tokens = [[r[0][1], input_ids[i + 1], pieces[i + 1]] for i, r in enumerate(rows[first - 1:], first - 1)]
            tops = [[[lp, tokenizer.piece_id(t), t] for t, lp in r[:k]] if k else [] for r in rows[first - 1:]]
            if int(start) == 0:
                return [[None, input_ids[0], pieces[0]], *tokens], [None, *tops]
            return tokens, tops

        def payload() -> dict[str, Any]:
            assert req.plan is not None
            n = req.generated
            meta: dict[str, Any] = {
                "id": req.rid, "finish_reason": finish_type(req), "prompt_tokens": req.prompt_tokens,
                "completion_tokens": n, "cached_tokens": req.cached_tokens, "e2e_latency": time.monotonic() - t0,
            }
            if req.logprobs:
                meta["output_token_logprobs"] = [
                    [lp, tid, p] for lp, tid, p in
                    zip(req.plan.logprobs[:n], req.output_ids[:n], req.plan.pieces[:n], strict=False)]
                meta["output_top_logprobs"] = [[[lp, tokenizer.piece_id(t), t] for t, lp in top]
                                               for top in req.plan.top_logprobs[:n]]
            if prompt_logprobs and req.finish_reason is not None:
                meta["input_token_logprobs"], meta["input_top_logprobs"] = input_logprobs()
            return {"text": req.text, "output_ids": req.output_ids[:n], "meta_info": meta}

        def payload_upto(n: int) -> dict[str, Any]:
            """A frame that shows only the first ``n`` tokens (a scripted fault holds the rest back)."""
            assert req.plan is not None
            return {"text": "".join(req.plan.pieces[:n]), "output_ids": req.output_ids[:n],
                    "meta_info": {"id": req.rid, "finish_reason": None, "prompt_tokens": req.prompt_tokens,
                                  "completion_tokens": n, "cached_tokens": req.cached_tokens}}

        if not body.get("stream"):
            async for _ in live.updates(req):
                pass
            return JSONResponse(payload())

        async def events() -> AsyncIterator[bytes]:
            sent, stalled = 0, False
            try:
                async for _ in live.updates(req):
                    while (n := faults.limit(sent, req.generated, stalled)) < req.generated:
                        yield wire.sse(payload_upto(n))
                        sent = n
                        stalled = await faults.after(sent, stalled)
                    yield wire.sse(payload())
                    sent = req.generated
                yield wire.DONE
            finally:
                if req.finish_reason is None or sent < req.generated:  # client went away: SGLang aborts it
                    engine().abort(req.rid)

        return StreamingResponse(events(), media_type="text/event-stream")

    # ---- /v1/chat/completions -----------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.json()
        messages = body.get("messages") or []
        input_ids = tokenizer.encode(render_chat(messages))
        if (bad := check_input(len(input_ids))) is not None:
            return bad
        if body.get("rid") and engine().is_live(str(body["rid"])):
            return _error(400, f"duplicate rid {body['rid']}")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 256
        req, live = submit(body, input_ids, max_tokens, messages=messages, tools=body.get("tools"),
                           tool_choice=body.get("tool_choice"), logprobs=bool(body.get("logprobs")),
                           top_logprobs=int(body.get("top_logprobs") or 0), seed=body.get("seed"),
                           ignore_eos=bool(body.get("ignore_eos")), prompt_text=render_chat(messages))
        cid, model = f"chatcmpl-{req.rid}", str(body.get("model") or model_name)

        def visible(n: int) -> int:
            assert req.plan is not None
            c = req.plan.content_tokens
            return n if c is None else min(n, c)

        def token_logprobs(a: int, b: int) -> list[TokenLogprob]:
            assert req.plan is not None
            if not req.logprobs:
                return []
            p = req.plan
            return [TokenLogprob(token=p.pieces[i], token_id=p.token_ids[i], logprob=p.logprobs[i],
                                 top=p.top_logprobs[i]) for i in range(a, b)]

        def usage() -> Usage:
            return Usage(prompt_tokens=req.prompt_tokens, completion_tokens=req.generated,
                         cached_tokens=req.cached_tokens)

        if not body.get("stream"):
            async for _ in live.updates(req):
                pass
            assert req.plan is not None and req.finish_reason is not None
            n = visible(req.generated)
            gen = Generation(rid=cid, text="".join(req.plan.pieces[:n]), logprobs=token_logprobs(0, n),
                             tool_calls=req.tool_calls, finish_reason=req.finish_reason, usage=usage())
            return Response(wire.json_bytes(wire.completion(gen, id=cid, model=model, with_logprobs=req.logprobs)),
                            media_type="application/json")

        async def chunks() -> AsyncIterator[GenerationChunk]:
            """Content as the engine decodes it (a scripted fault holds it back or breaks the
            stream), then the tool calls, finish reason and usage in the last chunk."""
            sent, stalled = 0, False
            try:
                async for _ in live.updates(req):
                    assert req.plan is not None
                    while True:
                        n = faults.limit(sent, visible(req.generated), stalled)
                        if n > sent:
                            yield GenerationChunk(rid=cid, text="".join(req.plan.pieces[sent:n]),
                                                  logprobs=token_logprobs(sent, n))
                            sent = n
                        if n == visible(req.generated):
                            break
                        stalled = await faults.after(sent, stalled)
                yield GenerationChunk(rid=cid, tool_calls=req.tool_calls, finish_reason=req.finish_reason,
                                      usage=usage())
            finally:
                if req.finish_reason is None:
                    engine().abort(req.rid)

        events = wire.ChunkEvents(cid, model, with_logprobs=req.logprobs,
                                  include_usage=bool((body.get("stream_options") or {}).get("include_usage")))
        return StreamingResponse(events.events(chunks()), media_type="text/event-stream")

    # ---- control and introspection ------------------------------------------------------

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        body = await request.json()
        e = engine()
        if body.get("abort_all"):
            for rid in e.live_rids():
                e.abort(rid)
        elif body.get("rid"):
            e.abort(str(body["rid"]))
        return Response(status_code=200)

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        if engine().flush_cache():
            return PlainTextResponse("Cache flushed.\nPlease check backend logs for more details. (When there are "
                                     "running or waiting requests, the operation will not be performed.)\n")
        return PlainTextResponse("Cache not flushed: there are running or waiting requests.\n", status_code=400)

    @app.get("/health")
    @app.get("/health_generate")
    @app.get("/ready")
    async def health() -> Response:
        return Response(status_code=200)

    def model_info() -> dict[str, Any]:
        return {"model_path": model_name, "served_model_name": model_name, "tokenizer_path": model_name,
                "is_generation": True, "model_type": "sim", "architectures": ["SimForCausalLM"],
                "weight_version": "default", "tool_call_parser": "sim", "preset": engine().cost.name}

    @app.get("/get_model_info")
    @app.get("/model_info")
    async def get_model_info() -> dict[str, Any]:
        return model_info()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "sim",
                                            "max_model_len": engine().cost.context_length}]}

    def load() -> dict[str, Any]:
        e = engine()
        s = e.stats
        return {"dp_rank": 0, "num_running_reqs": e.num_running, "num_waiting_reqs": len(e.waiting),
                "num_used_tokens": e.used_tokens, "max_total_num_tokens": e.capacity,
                "token_usage": e.used_tokens / e.capacity,
                "cache_hit_rate": s.cached_tokens / s.prompt_tokens if s.prompt_tokens else 0.0}

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def server_info() -> dict[str, Any]:
        e = engine()
        return {"model_path": model_name, "served_model_name": model_name, "max_total_num_tokens": e.capacity,
                "max_req_input_len": min(e.capacity, e.cost.context_length) - 1,
                "context_length": e.cost.context_length, "chunked_prefill_size": e.chunk_size,
                "max_running_requests": e.max_running, "enable_priority_scheduling": e.priority_scheduling,
                "radix_eviction_policy": e.radix_eviction_policy,
                "schedule_low_priority_values_first": False, "disable_priority_preemption": True,
                "enable_cache_report": True, "enable_metrics": True, "version": "sim", "status": "ready",
                "sim_preset": e.cost.name, "sim_speed": speed,
                "internal_states": [{"memory_usage": {"token_capacity": e.capacity},
                                     "effective_max_running_requests_per_dp": e.max_running}]}

    @app.get("/v1/loads")
    async def loads() -> dict[str, Any]:
        return {"loads": [load()]}

    @app.get("/metrics")
    async def metrics() -> Response:
        e, label = engine(), f'{{model_name="{model_name}"}}'
        s, current = e.stats, load()
        rows = [("num_running_reqs", "gauge", current["num_running_reqs"]),
                ("num_queue_reqs", "gauge", current["num_waiting_reqs"]),
                ("token_usage", "gauge", current["token_usage"]),
                ("cache_hit_rate", "gauge", current["cache_hit_rate"]),
                ("max_total_num_tokens", "gauge", e.capacity),
                ("kv_used_tokens", "gauge", e.used_tokens),
                ("num_requests_total", "counter", s.requests_finished + s.requests_aborted),
                ("num_aborted_requests_total", "counter", s.requests_aborted),
                ("prompt_tokens_total", "counter", s.prompt_tokens),
                ("generation_tokens_total", "counter", s.generation_tokens),
                ("cached_tokens_total", "counter", s.cached_tokens),
                ("num_retracted_reqs_total", "counter", s.retractions)]
        text = "".join(f"# TYPE sglang:{name} {kind}\nsglang:{name}{label} {value}\n" for name, kind, value in rows)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return app


def load_script(path: str, seed: int = 0) -> Script:
    """A script from a JSON file: ``{"kind": "problems", ...}`` is a ``ProblemScript`` (evolve),
    anything else an agent trace (``load_trace``)."""
    with open(path) as f:
        spec = json.load(f)
    if spec.get("kind") == "problems":
        return problem_script(spec, seed)
    return load_trace(path, seed)


def load_trace(path: str, seed: int = 0) -> AgentTraceScript:
    """An ``AgentTraceScript`` from a JSON file (a scripted agent for end-to-end tests and demos)."""
    with open(path) as f:
        spec = json.load(f)
    turns = [Turn(int(t.get("output_tokens", 8)), t.get("tool"),
                  t["arguments"] if isinstance(t.get("arguments"), str) else json.dumps(t.get("arguments", {})))
             for t in spec["turns"]]
    return AgentTraceScript(turns, seed)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--preset", default="llama-3.1-8b-h100", choices=sorted(PRESETS))
    ap.add_argument("--speed", type=float, default=1.0, help="simulated seconds per wall second")
    ap.add_argument("--capacity-tokens", type=int, help="KV pool size (default: the preset's)")
    ap.add_argument("--max-running-requests", type=int)
    ap.add_argument("--chunked-prefill-size", type=int)
    ap.add_argument("--enable-priority-scheduling", action="store_true")
    ap.add_argument("--radix-eviction-policy", choices=["lru", "priority"], default="lru")
    ap.add_argument("--served-model-name", default="sim-model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunked-script", metavar="TOKENS,CHUNKS",
                    help="replies of CHUNKS numbered chunks of TOKENS tokens each (' [k]' opens chunk k)")
    ap.add_argument("--stall-after-tokens", type=int, help="scripted fault: every stream pauses after N tokens")
    ap.add_argument("--stall-seconds", type=float, default=3600.0, help="how long a scripted stall lasts (wall)")
    ap.add_argument("--fail-after-tokens", type=int, help="scripted fault: every stream breaks after N tokens")
    ap.add_argument("--script", help="a JSON agent trace {\"turns\": [{\"output_tokens\": n, \"tool\": name, "
                                     "\"arguments\": {...}}, ...]}: the reply to a conversation is the turn "
                                     "numbered by its assistant messages; or {\"kind\": \"problems\", ...}, a solver "
                                     "of known problems for evolve (ProblemScript); default: pseudo-words")
    args = ap.parse_args(argv)
    config = EngineConfig(cost=preset(args.preset), kv_capacity_tokens=args.capacity_tokens,
                          max_running_requests=args.max_running_requests,
                          chunked_prefill_size=args.chunked_prefill_size,
                          enable_priority_scheduling=args.enable_priority_scheduling,
                          radix_eviction_policy=args.radix_eviction_policy)
    script: Script = PseudoScript(args.seed) if not args.script else load_script(args.script, args.seed)
    if args.chunked_script:
        tokens, chunks = (int(x) for x in args.chunked_script.split(","))
        script = ChunkedScript(tokens, chunks, args.seed)
    faults = Faults(args.stall_after_tokens, args.stall_seconds, args.fail_after_tokens)
    app = create_app(config, script=script, speed=args.speed, model_name=args.served_model_name, faults=faults)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

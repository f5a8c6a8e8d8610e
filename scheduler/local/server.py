"""An SGLang-compatible HTTP server for the local engine.

It speaks the subset of SGLang's API that ``SGLangBackend`` uses, with the real
server's field names (``/generate`` streams cumulative ``text``; usage carries
``prompt_tokens_details.cached_tokens``), so the SGLang client is exercised end
to end against real generation without a GPU:
``python -m scheduler.local.server --port 30000``.
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError

from scheduler.backends import openai_wire as wire
from scheduler.backends.base import GenerateRequest, GenerationChunk, TokenLogprob
from scheduler.local.engine import LocalEngine


def _lp_triples(lps: list[TokenLogprob]) -> list[list[Any]]:
    return [[lp.logprob, lp.token_id, lp.token] for lp in lps]


def _top_triples(lps: list[TokenLogprob]) -> list[list[list[Any]]]:
    return [[[v, None, t] for t, v in lp.top] for lp in lps]


def create_server(engine: LocalEngine) -> FastAPI:
    app = FastAPI(title="local engine (SGLang-compatible)")
    model_name = engine.loaded.name

    def bad_request(message: str) -> JSONResponse:
        return JSONResponse({"object": "error", "message": message, "type": "BadRequestError", "code": 400},
                            status_code=400)

    @app.post("/generate")
    async def generate(request: Request) -> Any:
        body = await request.json()
        sp = body.get("sampling_params") or {}
        start = body.get("logprob_start_len")
        start = -1 if start is None else int(start)  # SGLang: prompt logprobs from this position on
        try:
            req = GenerateRequest(
                rid=body.get("rid") or uuid.uuid4().hex, prompt=body.get("text"), input_ids=body.get("input_ids"),
                max_tokens=sp.get("max_new_tokens", 128), temperature=sp.get("temperature", 1.0),
                top_p=sp.get("top_p", 1.0), stop=sp.get("stop"), seed=sp.get("sampling_seed"),
                logprobs=bool(body.get("return_logprob")), top_logprobs=body.get("top_logprobs_num", 0),
                prompt_logprobs=bool(body.get("return_logprob")) and start >= 0,
                prompt_top_logprobs=body.get("top_logprobs_num", 0), priority=body.get("priority"))
        except (ValidationError, ValueError) as exc:
            return bad_request(str(exc))

        async def frames() -> AsyncIterator[dict[str, Any]]:
            text, ids, lps = "", [], []
            async for chunk in engine.stream(req):
                text += chunk.text
                ids += chunk.token_ids
                lps += chunk.logprobs
                yield _generate_frame(req, text, ids, lps, chunk, max(0, start))

        if body.get("stream"):
            async def stream() -> AsyncIterator[bytes]:
                async for frame in frames():
                    yield wire.sse(frame)
                yield wire.DONE

            return StreamingResponse(stream(), media_type="text/event-stream")
        last: dict[str, Any] = {}
        async for frame in frames():
            last = frame
        return last

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        try:
            req = GenerateRequest(
                rid=body.get("rid") or f"chatcmpl-{uuid.uuid4().hex}", messages=body.get("messages"),
                max_tokens=body.get("max_tokens") or body.get("max_completion_tokens") or 128,
                temperature=body.get("temperature", 1.0), top_p=body.get("top_p", 1.0),
                stop=[body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop"),
                seed=body.get("seed"), logprobs=bool(body.get("logprobs")),
                top_logprobs=body.get("top_logprobs") or 0, priority=body.get("priority"),
                tools=body.get("tools") or None, tool_choice=body.get("tool_choice"))
        except (ValidationError, ValueError) as exc:
            return bad_request(str(exc))
        model = body.get("model") or model_name
        if body.get("stream"):
            events = wire.ChunkEvents(req.rid, model, with_logprobs=req.logprobs,
                                      include_usage=bool((body.get("stream_options") or {}).get("include_usage")))
            return StreamingResponse(events.events(engine.stream(req)), media_type="text/event-stream")
        gen = await engine.generate(req)
        return Response(wire.json_bytes(wire.completion(gen, id=req.rid, model=model, with_logprobs=req.logprobs)),
                        media_type="application/json")

    @app.post("/abort_request")
    async def abort(request: Request) -> Response:
        body = await request.json()
        if body.get("abort_all"):
            for rid in engine.active_rids():
                await engine.abort(rid)
        elif body.get("rid"):
            await engine.abort(body["rid"])
        return Response()

    @app.get("/get_server_info")
    async def server_info() -> dict[str, Any]:
        cap = await engine.capacity()
        return {"max_total_num_tokens": cap.max_total_tokens, "max_req_input_len": cap.max_context_tokens,
                "context_length": cap.max_context_tokens, "status": "ready", "version": "local"}

    @app.get("/v1/loads")
    async def loads() -> dict[str, Any]:
        load = await engine.load()
        return {"loads": [{"num_running_reqs": load.running, "num_waiting_reqs": load.queued,
                           "num_used_tokens": load.used_tokens, "max_total_num_tokens": load.total_tokens,
                           "token_usage": load.used_tokens / max(1, load.total_tokens or 1),
                           "cache_hit_rate": engine.cache.hit_ratio}]}

    @app.get("/get_model_info")
    async def model_info() -> dict[str, Any]:
        return {"model_path": model_name, "served_model_name": model_name, "is_generation": True}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "max_model_len": engine.loaded.max_context_tokens}]}

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush() -> PlainTextResponse:
        engine.cache.clear()
        return PlainTextResponse("Cache flushed.")

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        load = await engine.load()
        label = f'{{model_name="{model_name}"}}'
        lines = [
            f"sglang:num_running_reqs{label} {load.running}",
            f"sglang:num_queue_reqs{label} {load.queued}",
            f"sglang:num_used_tokens{label} {load.used_tokens}",
            f"sglang:max_total_num_tokens{label} {load.total_tokens}",
            f"sglang:token_usage{label} {load.used_tokens / max(1, load.total_tokens or 1)}",
            f"sglang:cache_hit_rate{label} {engine.cache.hit_ratio}",
            f"sglang:num_requests_total{label} {engine.stats['requests']}",
            f"sglang:prompt_tokens_total{label} {engine.stats['prompt_tokens']}",
            f"sglang:cached_tokens_total{label} {engine.stats['cached_tokens']}",
            f"sglang:generation_tokens_total{label} {engine.stats['generation_tokens']}",
        ]
        return PlainTextResponse("\n".join(lines) + "\n")

    return app


def _generate_frame(req: GenerateRequest, text: str, ids: list[int], lps: list[TokenLogprob],
                    chunk: GenerationChunk, prompt_start: int = 0) -> dict[str, Any]:
    meta: dict[str, Any] = {"id": req.rid, "finish_reason": {"type": chunk.finish_reason}
                            if chunk.finish_reason else None}
    if chunk.usage is not None:
        meta.update(prompt_tokens=chunk.usage.prompt_tokens, completion_tokens=chunk.usage.completion_tokens,
                    cached_tokens=chunk.usage.cached_tokens)
    if req.logprobs or req.prompt_logprobs:
        meta["output_token_logprobs"] = _lp_triples(lps)
        meta["output_top_logprobs"] = _top_triples(lps)
        if chunk.prompt_logprobs is not None:
            # SGLang gives the first prompt token a null logprob.
            meta["input_token_logprobs"] = [[None, None, None], *_lp_triples(chunk.prompt_logprobs)][prompt_start:]
            meta["input_top_logprobs"] = [None, *_top_triples(chunk.prompt_logprobs)][prompt_start:]
    return {"text": text, "output_ids": ids, "meta_info": meta}


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Serve the local engine with an SGLang-compatible API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--cache-tokens", type=int, default=16384)
    args = parser.parse_args()
    uvicorn.run(create_server(LocalEngine(cache_tokens=args.cache_tokens)), host=args.host, port=args.port)


if __name__ == "__main__":
    main()

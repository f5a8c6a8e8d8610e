"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The database (and Redis, when configured) answer")
async def readyz(request: Request) -> Response:
    state = request.app.state
    checks: dict[str, str] = {}
    try:
        await state.store.ping()
        checks["database"] = "ok"
    except Exception as exc:  # report, don't raise: readiness is an answer, not an error
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        await state.bus.ping()
        checks["bus"] = "ok"
    except Exception as exc:
        checks["bus"] = f"error: {type(exc).__name__}"
    for check, result in checks.items():
        if result != "ok":
            state.metrics.readiness_failures.labels(check).inc()
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse,
            responses={200: {"description": "The Prometheus text format, version 0.0.4",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

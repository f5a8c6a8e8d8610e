"""The FastAPI application factory.

``create_app(settings)`` wires one service process: database engine and
migrations, event bus, rate limiter, workflow registry, metrics, and the worker
that executes runs. Everything lives on ``app.state``; nothing is module-global.
"""

from __future__ import annotations

import logging
from pathlib import Path
from contextlib import asynccontextmanager
from typing import Any
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from orchestrator.api import batches, docs, gateway, health, openapi, runs
from orchestrator.api.fast import FastRoutes
from orchestrator.auth import KeyRing
from orchestrator.db import create_engine, migrate
from orchestrator.errors import APIError, ValidationFailed
from orchestrator.events import create_bus
from orchestrator.metrics import Metrics, SandboxCollector, SchedulerCollector, StorageCollector
from orchestrator.middleware import RequestContextMiddleware
from orchestrator.quotas import create_rate_limiter
from orchestrator.runs.batches import BatchStore
from orchestrator.runs.store import RunStore
from orchestrator.runs.worker import Worker
from orchestrator.services import Services
from orchestrator.settings import DEV_API_KEY, Settings
from orchestrator.workflows import default_registry
from scheduler.backends.factory import make_backend
from scheduler.runtime import ProgramRuntime
from tools.sandbox import SandboxPool, SubprocessSandbox

log = logging.getLogger(__name__)
ROUTERS = (runs.router, batches.router, gateway.router, health.router)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings.database_url, pool_size=settings.db_pool_size)
        await migrate(engine)
        bus = create_bus(settings.redis_url)
        await bus.start()
        store = RunStore(engine, bus, settings.queues)
        app.state.store = store
        app.state.batches = BatchStore(store)
        app.state.bus = bus
        app.state.rate_limiter = create_rate_limiter(settings.redis_url)
        services = Services(metrics=metrics)
        app.state.services = services
        worker = Worker(store, app.state.registry, settings, metrics, services) if settings.worker_enabled else None
        app.state.worker = worker
        if DEV_API_KEY in settings.api_keys:
            log.warning("the development API key is enabled; set ORCH_API_KEYS in production")
        sandboxes = make_sandbox_pool(settings)
        services.sandboxes = sandboxes
        sandbox_collector = SandboxCollector(sandboxes)
        metrics.registry.register(sandbox_collector)
        storage_collector = StorageCollector(engine, bus)
        metrics.registry.register(storage_collector)
        runtime = None
        if settings.backends:
            runtime = ProgramRuntime({b.name: make_backend(b) for b in settings.backends},
                                     policy=settings.scheduler_policy,
                                     policy_options=settings.scheduler_policy_options,
                                     idle_release_s=settings.program_idle_release_s,
                                     on_prepare_sandbox=_prepare(sandboxes), on_collect_sandbox=sandboxes.release)
            await runtime.start()
            collector = SchedulerCollector(runtime)
            metrics.registry.register(collector)
        app.state.runtime = runtime
        services.runtime = runtime
        if worker is not None:
            await worker.start()
        log.info("service ready", extra={"database": engine.dialect.name, "bus": bus.name,
                                         "worker": worker.id if worker else None})
        try:
            yield
        finally:
            if worker is not None:
                await worker.stop()
            if runtime is not None:
                metrics.registry.unregister(collector)
                await runtime.close()
                for b in runtime.backends.values():
                    await b.close()
            metrics.registry.unregister(sandbox_collector)
            metrics.registry.unregister(storage_collector)
            await sandboxes.close()
            await app.state.rate_limiter.close()
            await bus.close()
            await engine.dispose()

    app = ServiceApp(
        title="Agentic orchestrator",
        version="0.1.0",
        description="Program-aware control plane for LLM agent workflows in front of SGLang backends.",
        lifespan=lifespan,
        docs_url=None,  # docs.install: /docs with Swagger UI's assets served here, not from a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.keyring = KeyRing(settings.api_keys)
    app.state.registry = default_registry(settings.workflow_modules)
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes,
                       body_timeout_s=settings.body_read_timeout_s)
    # the fast routes run inside their own request context (id, access log, metrics), ahead of FastAPI
    app.fast_routes = FastRoutes([*gateway.FAST_ROUTES, runs.CREATE_RUN_ROUTE])
    app.fast_stack = RequestContextMiddleware(app.fast_routes, metrics=metrics, max_body_bytes=settings.max_body_bytes,
                                              body_timeout_s=settings.body_read_timeout_s)
    _install_error_handlers(app)
    openapi.install(app, app.state.registry, gateway.FAST_ROUTES, gateway.FAST_SCHEMAS, settings.max_tokens_ceiling,
                    list(settings.queues))
    batches.install_openapi(app)
    docs.install(app)
    return app


class ServiceApp(FastAPI):
    """FastAPI, with the hot path's plain ASGI routes (``orchestrator.api.fast``) answered before
    FastAPI's own middleware stack: a request they serve never enters it."""

    fast_routes: FastRoutes | None = None
    fast_stack: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.fast_stack is not None and self.fast_routes is not None and self.fast_routes.serves(scope):
            scope["app"] = self  # as Starlette sets it: handlers reach app.state through the request
            await self.fast_stack(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def make_sandbox_pool(settings: Settings) -> SandboxPool:
    """One sandbox per program: a subprocess under ``ORCH_SANDBOX_ROOT``, or a Kubernetes pod."""
    if settings.sandbox_kind == "kubernetes":
        from tools.sandbox.kubernetes import KubernetesSandboxConfig, KubernetesSandboxFactory

        factory: Any = KubernetesSandboxFactory(KubernetesSandboxConfig(**settings.sandbox_kubernetes))
    else:
        root = Path(settings.sandbox_root).resolve()

        async def factory(program_id: str) -> SubprocessSandbox:
            return await SubprocessSandbox.create(root, program_id)

    return SandboxPool(factory, max_sandboxes=settings.sandbox_max,
                       max_concurrent_exec=settings.sandbox_exec_concurrency)


def _prepare(pool: SandboxPool):  # type: ignore[no-untyped-def]
    async def prepare(program_id: str) -> None:
        pool.prepare(program_id)

    return prepare


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status_code, headers=err.headers)


def _install_error_handlers(app: FastAPI) -> None:
    """The API's error shape for its own errors and FastAPI's. Unexpected exceptions are answered
    by ``RequestContextMiddleware``: a handler for ``Exception`` here would run outside every
    middleware, so its 500s lost the request id (header and log line)."""
    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(ValidationFailed.first_of(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        cls = {404: ("not_found_error", "not_found"), 405: ("invalid_request_error", "method_not_allowed")}
        type_, code = cls.get(exc.status_code, ("invalid_request_error", "http_error"))
        headers = {"Allow": _allowed_methods(request)} if exc.status_code == 405 else \
            dict(exc.headers) if exc.headers else None
        err = APIError(str(exc.detail), code=code, headers=headers)
        err.type, err.status_code = type_, exc.status_code
        return _error_response(err)


def _allowed_methods(request: Request) -> str:
    """The ``Allow`` of a 405: every method the path answers. Starlette's names only those of the
    first route matching the path (``Allow: POST`` for ``/v1/runs``, which answers GET too)."""
    routes = [*request.app.routes, *(route for router in ROUTERS for route in router.routes)]
    return ", ".join(sorted({method for route in routes if isinstance(route, Route) and route.methods
                             and route.matches(request.scope)[0] is not Match.NONE for method in route.methods}))

"""The sandbox agent: the ``Sandbox`` operations over HTTP, run inside a Kubernetes pod.

``python -m tools.sandbox.agent --port 8088 --workspace /workspace`` serves the pod's own
subprocess sandbox; :func:`create_agent_app` serves any ``Sandbox``. JSON in and out; a refusal
(``SandboxError``, bad input) is ``400 {"error": message}`` and becomes ``SandboxError`` on the
client side (:mod:`tools.sandbox.kubernetes`).

Every route but ``/healthz`` (the kubelet's readiness probe) needs the pod's secret, either as
``Authorization: Bearer <token>`` (direct pod-IP calls) or as ``X-Sandbox-Token: <token>``: the
API server's pod proxy authenticates the control plane by its own ``Authorization`` header and
strips it before forwarding, so through the proxy the pod's secret must travel in another header.

Routes: ``POST /exec {argv, stdin_b64, limits, env}`` -> ExecResult; ``GET /files?path=&recursive=
&limit=`` -> [FileEntry]; ``GET /file?path=&max_bytes=`` -> raw bytes; ``PUT|POST /file?path=``
(raw body); ``GET /disk`` -> ``{"bytes": n}``; ``POST /kill``; ``GET /healthz``.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tools.sandbox.base import Limits, Sandbox, SandboxError

TOKEN_HEADER = "x-sandbox-token"
TOKEN_ENV = "SANDBOX_TOKEN"
_LIMIT_FIELDS = {f.name for f in dataclasses.fields(Limits)}

log = logging.getLogger(__name__)
Handler = Callable[[Request], Awaitable[Response]]


def request_token(request: Request) -> str:
    """The token a request carries: ``X-Sandbox-Token``, else ``Authorization: Bearer``."""
    if TOKEN_HEADER in request.headers:
        return request.headers[TOKEN_HEADER]
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def create_agent_app(sandbox: Sandbox, token: str) -> Starlette:
    """An ASGI app serving ``sandbox`` to whoever knows ``token`` (compared in constant time)."""
    if not token:
        raise ValueError("the sandbox agent needs a token")
    expected = token.encode()

    def guard(handler: Handler) -> Handler:
        async def wrapped(request: Request) -> Response:
            if not hmac.compare_digest(request_token(request).encode(), expected):
                return JSONResponse({"error": "missing or wrong sandbox token"}, status_code=401)
            try:
                return await handler(request)
            except SandboxError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            except (ValueError, KeyError, TypeError) as exc:
                return JSONResponse({"error": f"bad request: {exc!r}"}, status_code=400)
            except Exception as exc:
                log.exception("sandbox agent: %s %s failed", request.method, request.url.path)
                return JSONResponse({"error": f"sandbox agent failed: {exc!r}"}, status_code=500)

        return wrapped

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def exec_(request: Request) -> Response:
        body = await request.json()
        argv = body["argv"]
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("argv must be a non-empty list of strings")
        raw_limits = body.get("limits") or None
        limits = Limits(**{k: v for k, v in raw_limits.items() if k in _LIMIT_FIELDS}) if raw_limits else None
        stdin = base64.b64decode(body["stdin_b64"]) if body.get("stdin_b64") is not None else None
        result = await sandbox.exec(argv, stdin=stdin, limits=limits, env=body.get("env") or None)
        return JSONResponse(dataclasses.asdict(result))

    async def read(request: Request) -> Response:
        q = request.query_params
        data = await sandbox.read_file(q["path"], max_bytes=int(q.get("max_bytes", 1 << 20)))
        return Response(data, media_type="application/octet-stream")

    async def write(request: Request) -> Response:
        await sandbox.write_file(request.query_params["path"], await request.body())
        return JSONResponse({"ok": True})

    async def files(request: Request) -> Response:
        q = request.query_params
        entries = await sandbox.list_files(q.get("path", "."), recursive=q.get("recursive") in ("true", "1"),
                                           limit=int(q.get("limit", 1000)))
        return JSONResponse([dataclasses.asdict(e) for e in entries])

    async def disk(_request: Request) -> Response:
        return JSONResponse({"bytes": await sandbox.disk_bytes()})

    async def kill(_request: Request) -> Response:
        await sandbox.kill()
        return JSONResponse({"ok": True})

    return Starlette(routes=[
        Route("/healthz", healthz),
        Route("/exec", guard(exec_), methods=["POST"]),
        Route("/file", guard(read), methods=["GET"]),
        # PUT per the REST habit; POST too, so that through the pod proxy the control plane's
        # RBAC needs only pods/proxy get + create (PUT would need update as well).
        Route("/file", guard(write), methods=["PUT", "POST"]),
        Route("/files", guard(files), methods=["GET"]),
        Route("/disk", guard(disk), methods=["GET"]),
        Route("/kill", guard(kill), methods=["POST"]),
    ])


def main(argv: list[str] | None = None) -> None:
    """Serve this pod's workspace (``<workspace>/w``) with a subprocess sandbox inside it."""
    import asyncio

    import uvicorn

    from tools.sandbox.subprocess import SubprocessSandbox

    ap = argparse.ArgumentParser(description="Serve this pod's sandbox to the control plane.")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8088)
    ap.add_argument("--workspace", default="/workspace")
    ap.add_argument("--token-file", help=f"read the token from this file instead of ${TOKEN_ENV}")
    args = ap.parse_args(argv)
    # Taken out of the environment so the commands the sandbox runs do not inherit it.
    token = os.environ.pop(TOKEN_ENV, "")
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    if not token:
        raise SystemExit(f"sandbox agent: no token (set ${TOKEN_ENV} or --token-file)")

    async def serve() -> None:
        sandbox = await SubprocessSandbox.create(Path(args.workspace), "w")
        config = uvicorn.Config(create_agent_app(sandbox, token), host=args.host, port=args.port,
                                log_level="warning")
        try:
            await uvicorn.Server(config).serve()
        finally:
            await sandbox.kill()

    asyncio.run(serve())


if __name__ == "__main__":
    main()

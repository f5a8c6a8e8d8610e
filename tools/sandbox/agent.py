"""The sandbox agent: the ``Sandbox`` operations over HTTP, run inside a Kubernetes pod.

``python -m tools.sandbox.agent --port 8088 --workspace /workspace`` serves the pod's own
subprocess sandbox. The control plane reaches it through the API server's pod proxy, which
drops the client's ``Authorization`` header, so the per-pod secret travels in
``X-Sandbox-Token`` (the pod reads it from ``SANDBOX_TOKEN``). JSON in and out; refusals are
``400 {"error": message}`` and become ``SandboxError`` on the client side.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hmac
import os
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tools.sandbox.base import Limits, Sandbox, SandboxError

TOKEN_HEADER = "x-sandbox-token"


def create_agent_app(sandbox: Sandbox, token: str) -> Starlette:
    if not token:
        raise ValueError("the sandbox agent needs a token")

    def authorized(request: Request) -> bool:
        return hmac.compare_digest(request.headers.get(TOKEN_HEADER, ""), token)

    def guard(handler):  # type: ignore[no-untyped-def]
        async def wrapped(request: Request) -> Response:
            if not authorized(request):
                return JSONResponse({"error": "missing or wrong sandbox token"}, status_code=401)
            try:
                return await handler(request)
            except SandboxError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            except (ValueError, KeyError, TypeError) as exc:
                return JSONResponse({"error": f"bad request: {exc}"}, status_code=400)

        return wrapped

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def exec_(request: Request) -> Response:
        body = await request.json()
        limits = Limits(**body["limits"]) if body.get("limits") else None
        stdin = base64.b64decode(body["stdin_b64"]) if body.get("stdin_b64") else None
        result = await sandbox.exec(list(body["argv"]), stdin=stdin, limits=limits, env=body.get("env"))
        return JSONResponse(dataclasses.asdict(result))

    async def read(request: Request) -> Response:
        data = await sandbox.read_file(request.query_params["path"],
                                       max_bytes=int(request.query_params.get("max_bytes", 1 << 20)))
        return Response(data, media_type="application/octet-stream")

    async def write(request: Request) -> Response:
        await sandbox.write_file(request.query_params["path"], await request.body())
        return JSONResponse({"ok": True})

    async def files(request: Request) -> Response:
        q = request.query_params
        entries = await sandbox.list_files(q.get("path", "."), recursive=q.get("recursive") == "true",
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
        Route("/file", guard(write), methods=["PUT"]),
        Route("/files", guard(files)),
        Route("/disk", guard(disk)),
        Route("/kill", guard(kill), methods=["POST"]),
    ])


def main(argv: list[str] | None = None) -> None:
    import asyncio

    import uvicorn

    from tools.sandbox.subprocess import SubprocessSandbox

    ap = argparse.ArgumentParser(description="Serve this pod's sandbox to the control plane.")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8088)
    ap.add_argument("--workspace", default="/workspace")
    args = ap.parse_args(argv)
    token = os.environ.pop("SANDBOX_TOKEN", "")  # not inherited by the commands

    async def serve() -> None:
        sandbox = await SubprocessSandbox.create(Path(args.workspace), "w")
        config = uvicorn.Config(create_agent_app(sandbox, token), host=args.host, port=args.port,
                                log_level="warning")
        await uvicorn.Server(config).serve()

    asyncio.run(serve())


if __name__ == "__main__":
    main()

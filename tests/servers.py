"""Run the real service for tests: in this event loop (uvicorn on a loopback port) or as a
subprocess that a test can SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncContextManager, AsyncIterator

import httpx
import uvicorn

from orchestrator import Settings, create_app
from scheduler.sim.cost import preset
from scheduler.sim.engine import EngineConfig
from scheduler.sim.server import create_app as create_sim_app

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def serve_app(app: Any, *, force_exit: bool = False) -> AsyncIterator[str]:
    """Serve an ASGI app under uvicorn in this loop, on a free loopback port; yields its base URL.
    ``force_exit``: at the end, do not wait for open connections (a test's hanging ones)."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(400):
            if server.started:
                break
            if task.done():
                task.result()
            await asyncio.sleep(0.025)
        else:
            raise RuntimeError("server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        server.force_exit = force_exit
        await asyncio.wait_for(task, 30)


def running_server(settings: Settings) -> AsyncContextManager[str]:
    """The service's app under uvicorn in this loop; yields its base URL."""
    return serve_app(create_app(settings))


def running_sim(preset_name: str, speed: float) -> AsyncContextManager[str]:
    """The SGLang simulator's server in this loop (``preset_name``'s context length and costs,
    ``speed`` simulated seconds a second); yields its base URL."""
    return serve_app(create_sim_app(EngineConfig(cost=preset(preset_name)), speed=speed))


class ServiceProcess:
    """The service in its own process, configured by ``ORCH_*`` variables."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.env = {**os.environ, **env, "ORCH_PORT": str(self.port), "ORCH_HOST": "127.0.0.1",
                    "PYTHONPATH": str(ROOT)}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "ServiceProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-c", "from orchestrator.server import serve; serve()"],
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("service did not become ready")

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, leases are left to expire."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class SimServerProcess:
    """The simulator's SGLang-compatible server in its own process (to SIGKILL or SIGSTOP)."""

    def __init__(self, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> "SimServerProcess":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler.sim.server", "--port", str(self.port), *self.args],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sim server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("sim server did not become healthy")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process must run to die cleanly
            self.proc.kill()
            self.proc.wait(10)

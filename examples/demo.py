"""`make demo`: start the service on its embedded default (SQLite file, in-process bus),
submit an example workflow with the SDK, follow its event stream live, show the result."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from orchestrator.client import Client

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-orch-dev"  # the development key the service accepts when ORCH_API_KEYS is unset


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    port = free_port()
    (ROOT / "var").mkdir(exist_ok=True)
    env = {**os.environ, "ORCH_PORT": str(port), "ORCH_LOG_LEVEL": "WARNING",
           "ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{ROOT}/var/demo.db"}
    env.pop("ORCH_API_KEYS", None)
    log = open(ROOT / "var" / "demo-service.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                print(open(ROOT / "var" / "demo-service.log").read(), file=sys.stderr)
                return 1
            time.sleep(0.1)
        print(f"service ready on {base} (SQLite file var/demo.db, in-process event bus)")
        with Client(base_url=base, api_key=KEY) as client:
            run = client.runs.create("demo", input={"steps": 4, "step_seconds": 0.4}, metadata={"source": "make demo"})
            print(f"submitted {run.id} ({run.workflow}), status {run.status}")
            for event in client.runs.stream(run.id):
                print(f"  [{event.seq:>2}] {event.type:<15} {event.data}")
            final = client.runs.get(run.id)
            print(f"run {final.id} {final.status}: output {final.output}")
            return 0 if final.status == "succeeded" else 1
    finally:
        proc.terminate()
        proc.wait(15)


if __name__ == "__main__":
    raise SystemExit(main())

"""`make demo`: start the service on its embedded default (SQLite file, in-process bus) with the
local SmolLM2-135M engine as its LLM backend, submit an ``agent`` run with the SDK, and follow
its event stream live: each LLM turn, each tool call in the run's sandbox, the answer.

SmolLM2-135M is a very small model: its answers are weak and it may not call tools well. The
point is the machinery: the run goes through the scheduler, its tools run sandboxed, every turn
is a checkpointed step, and it ends within its budgets whatever the model writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from orchestrator_sdk import Client

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-orch-dev"  # the development key the service accepts when ORCH_API_KEYS is unset

TASK = {
    "task": "Use the shell tool with the command: python3 hello.py. Then give its output "
            "with final_answer.",
    "files": {"hello.py": "print('hello from the sandbox', 6 * 7)\n"},
    "tools": ["shell", "final_answer"],
    "tool_choice": "required",
    "max_turns": 4,
    "max_tokens_per_turn": 96,
    "time_budget_s": 240,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."


def show(event_type: str, data: dict) -> str:
    if event_type == "agent.turn":
        calls = ", ".join(f"{c['name']}({_short(c['arguments'], 80)})" for c in data["tool_calls"]) or "no tool call"
        text = (data["text"] or "").strip().replace("\n", " ")[:120]
        return f"turn {data['turn']}: {calls}" + (f" | text: {text!r}" if text else "") + \
            f" | {data['usage']['prompt_tokens']} prompt ({data['usage']['cached_tokens']} cached), " \
            f"{data['usage']['completion_tokens']} out"
    if event_type == "agent.tool":
        content = (data["content"] or "").strip().replace("\n", " | ")[:160]
        return f"  {data['tool']} -> {'ok' if data['ok'] else data['error']} in {data['duration_s']} s: {content}"
    return json.dumps(data)[:200]


def main() -> int:
    port = free_port()
    (ROOT / "var").mkdir(exist_ok=True)
    env = {**os.environ, "ORCH_PORT": str(port), "ORCH_LOG_LEVEL": "WARNING",
           "ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{ROOT}/var/demo.db",
           "ORCH_SANDBOX_ROOT": str(ROOT / "var" / "demo-sandboxes"),
           "ORCH_BACKENDS": json.dumps([{"name": "local-smollm2", "kind": "local"}])}
    env.pop("ORCH_API_KEYS", None)
    log = open(ROOT / "var" / "demo-service.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        print("starting the service and loading SmolLM2-135M-Instruct on the CPU ...")
        for _ in range(1200):
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                print(open(ROOT / "var" / "demo-service.log").read(), file=sys.stderr)
                return 1
            time.sleep(0.1)
        print(f"service ready on {base} (SQLite file var/demo.db, in-process event bus, local model)")
        with Client(base_url=base, api_key=KEY, timeout=30) as client:
            run = client.runs.create("agent", input=TASK, metadata={"source": "make demo"})
            print(f"submitted {run.id} ({run.workflow}): {TASK['task']}")
            for event in client.runs.stream(run.id):
                print(f"[{event.seq:>2}] {event.type:<15} {show(event.type, event.data)}")
            final = client.runs.get(run.id)
            out = final.output or {}
            print(f"run {final.id} {final.status}: stop reason {out.get('stop_reason')}, "
                  f"{out.get('turns')} turns, {out.get('tool_calls')} tool calls, answer {out.get('answer')!r}")
            print(f"steps: {[s.name for s in client.runs.steps(run.id)]}")
            return 0 if final.status == "succeeded" else 1
    finally:
        proc.terminate()
        proc.wait(15)


if __name__ == "__main__":
    raise SystemExit(main())

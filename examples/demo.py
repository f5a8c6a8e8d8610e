"""`make demo`: start the service on its embedded default (SQLite file, in-process bus) with the
local SmolLM2-135M engine as its LLM backend, submit an ``agent`` run with the SDK, and follow
its event stream live: each LLM turn, each tool call in the run's sandbox and its output, the
answer; then what the scheduler did (dispatches, pauses while tools ran, KV cache hits).

SmolLM2-135M is a very small model. Its tool calls are well-formed because the local engine
decodes them under a grammar built from the tools' schemas (as SGLang does with constrained
decoding); what it chooses to do is still a 135M model's choice, so the task is a simple one.
A run that ends without an answer is reported as such and the demo exits non-zero."""

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
    "task": 'What is the secret word? Find it with shell: {"command": "python3 secret.py"}, then give '
            "the word with final_answer.",
    "files": {"secret.py": "print('the secret word is', 'banana'.upper())\n"},
    "tools": ["shell", "final_answer"],
    "tool_choice": "required",
    "max_turns": 5,
    "max_tokens_per_turn": 64,
    "time_budget_s": 300,
}
SCHEDULER_LINES = ("orchestrator_scheduler_dispatches", "orchestrator_scheduler_pauses",
                   "orchestrator_scheduler_resumes", "orchestrator_scheduler_programs_released",
                   "orchestrator_scheduler_prompt_tokens", "orchestrator_scheduler_cached_tokens",
                   "orchestrator_scheduler_kv_hit_ratio")


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
    if event_type == "agent.repeat":
        return f"turn {data['turn']} repeated a call with the same result; next turn: {data['next_tool_choice']}"
    return json.dumps(data)[:200]


def scheduler_figures(base: str) -> list[str]:
    """The scheduler's counters from /metrics: what it dispatched, paused and found cached."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    figures = []
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.removesuffix("_total") in SCHEDULER_LINES and value:
            figures.append(f"{name.removeprefix('orchestrator_scheduler_').removesuffix('_total')} "
                           f"{float(value):g}")
    return figures


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
            print(f"steps (checkpointed): {[s.name for s in client.runs.steps(run.id)]}")
            print("scheduler: " + ", ".join(scheduler_figures(base)))
            answered = final.status == "succeeded" and out.get("stop_reason") == "final_answer"
            print(f"run {final.id} {final.status}: stop reason {out.get('stop_reason')}, "
                  f"{out.get('turns')} turns, {out.get('tool_calls')} tool calls")
            if not answered:
                print(f"the agent gave no answer (stop reason {out.get('stop_reason')}): not a success")
                return 1
            print(f"answer: {out.get('answer')!r}")
            return 0
    finally:
        proc.terminate()
        proc.wait(15)


if __name__ == "__main__":
    raise SystemExit(main())

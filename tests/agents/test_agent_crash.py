"""Crash: SIGKILL the service while an agent's tool runs; a new process recovers the run, replays
its finished turns and tool calls from their checkpoints (no LLM call or tool run repeated) and
finishes it in the same workspace."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.agents.test_agent_sim import BUGGY, TEST, _processes_with, _sim_metric
from tests.servers import ServiceProcess, SimServerProcess

pytestmark = pytest.mark.slow
A = {"Authorization": "Bearer sk-crash"}

TRACE = [
    {"output_tokens": 20, "tool": "write_file", "arguments": {"path": "calc.py", "content": BUGGY}},
    {"output_tokens": 20, "tool": "write_file", "arguments": {"path": "test_calc.py", "content": TEST}},
    {"output_tokens": 20, "tool": "shell", "arguments": {"command": "sleep 3.125; python3 test_calc.py"}},
    {"output_tokens": 20, "tool": "str_replace", "arguments": {"path": "calc.py", "old": "a - b", "new": "a + b"}},
    {"output_tokens": 20, "tool": "shell", "arguments": {"command": "python3 test_calc.py"}},
    {"output_tokens": 20, "tool": "final_answer", "arguments": {"answer": "fixed"}},
]


def test_sigkill_during_a_tool_call_resumes_the_agent(tmp_path: Path):
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"turns": TRACE}))
    sim = SimServerProcess("--speed", "50", "--script", str(trace)).start()
    env = {"ORCH_API_KEYS": "sk-crash=t", "ORCH_LEASE_SECONDS": "2", "ORCH_HEARTBEAT_SECONDS": "0.4",
           "ORCH_WORKER_POLL_SECONDS": "0.2", "ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/orch.db",
           "ORCH_SANDBOX_ROOT": str(tmp_path / "sandboxes"),
           "ORCH_BACKENDS": json.dumps([{"name": "sim", "kind": "sglang", "url": sim.url}])}
    first = ServiceProcess(env, tmp_path / "first.log").start()
    second = None
    try:
        r = httpx.post(f"{first.url}/v1/runs", headers=A, json={"workflow": "agent", "input": {"task": "Fix."}})
        run_id = r.json()["id"]
        deadline = time.monotonic() + 20
        while not _processes_with("sleep 3.125") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _processes_with("sleep 3.125"), "the third turn's tool never started"
        first.kill()
        time.sleep(0.3)
        assert _processes_with("sleep 3.125") == []  # the tool died with the service
        assert _sim_metric(sim.url, "num_requests_total") == 3

        second = ServiceProcess(env, tmp_path / "second.log").start()
        final = httpx.get(f"{second.url}/v1/runs/{run_id}", headers=A, params={"wait": 45}, timeout=60).json()
        assert final["status"] == "succeeded", final
        out = final["output"]
        assert (out["stop_reason"], out["answer"], out["turns"], out["tool_calls"]) == ("final_answer", "fixed", 6, 6)
        assert _sim_metric(sim.url, "num_requests_total") == 6  # turns 0-2 replayed, not asked again
        events = httpx.get(f"{second.url}/v1/runs/{run_id}/events", headers=A, params={"limit": 100}).json()["data"]
        types = [e["type"] for e in events]
        assert "run.recovered" in types and types.count("agent.turn") == 6
        tools = [e["data"] for e in events if e["type"] == "agent.tool"]
        assert [t["tool"] for t in tools] == ["write_file", "write_file", "shell", "str_replace", "shell",
                                              "final_answer"]
        # the files written before the crash were still there for the fix and the passing test
        assert "AssertionError" in tools[2]["content"] and "tests passed" in tools[4]["content"]
        steps = httpx.get(f"{second.url}/v1/runs/{run_id}/steps", headers=A).json()["data"]
        assert [s["attempt"] for s in steps if s["name"] == "tool-2-0"] == [2]  # the interrupted one ran again
        assert {s["attempt"] for s in steps if s["name"] in ("turn-0", "tool-0-0", "turn-2")} == {1}
    finally:
        first.stop()
        if second is not None:
            second.stop()
        sim.kill()

"""The ``agent`` workflow end to end: the real service on loopback, its worker, the scheduler
runtime, real subprocess sandboxes, and the simulator's SGLang-compatible server in its own
process playing a scripted coding agent (deterministic tool calls)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import AsyncIterator

import httpx
import pytest

from orchestrator import Settings
from orchestrator_sdk import AsyncClient
from tests.servers import SimServerProcess, running_server

pytestmark = pytest.mark.slow

KEY = "sk-agent"
BUGGY = "def add(a, b):\n    return a - b\n"
TEST = "from calc import add\nassert add(2, 3) == 5, f'add(2, 3) = {add(2, 3)}'\nprint('tests passed')\n"

CODING_TRACE = [
    {"output_tokens": 40, "tool": "write_file", "arguments": {"path": "calc.py", "content": BUGGY}},
    {"output_tokens": 50, "tool": "write_file", "arguments": {"path": "test_calc.py", "content": TEST}},
    {"output_tokens": 20, "tool": "shell", "arguments": {"command": "python3 test_calc.py"}},
    {"output_tokens": 30, "tool": "str_replace", "arguments": {"path": "calc.py", "old": "a - b", "new": "a + b"}},
    {"output_tokens": 20, "tool": "shell", "arguments": {"command": "python3 test_calc.py"}},
    {"output_tokens": 20, "tool": "final_answer", "arguments": {"answer": "Fixed add() in calc.py; the test passes."}},
]

BAD_CALLS_TRACE = [
    {"output_tokens": 20, "tool": "rm_rf", "arguments": {"path": "/"}},                      # unknown tool
    {"output_tokens": 20, "tool": "write_file", "arguments": {"path": "x.txt"}},              # missing argument
    {"output_tokens": 20, "tool": "read_file", "arguments": {"path": "../../etc/passwd"}},    # outside workspace
    {"output_tokens": 20, "tool": "str_replace", "arguments": {"path": "nope.py", "old": "a", "new": "b"}},
    {"output_tokens": 20, "tool": "final_answer", "arguments": {"answer": "done despite errors"}},
]

SLOW_TOOL_TRACE = [{"output_tokens": 10, "tool": "shell", "arguments": {"command": "sleep 47.25; echo late"}}]


def _sim(tmp_path: Path, name: str, trace: list[dict]) -> SimServerProcess:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"turns": trace}))
    return SimServerProcess("--speed", "50", "--script", str(path)).start()


@pytest.fixture
async def service(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, Path]]:
    sim = _sim(tmp_path, "trace", request.param)
    sandboxes = tmp_path / "sandboxes"
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/agent.db", api_keys={KEY: "acme"},
                        log_json=False, worker_poll_seconds=0.1, sandbox_root=str(sandboxes),
                        backends=[{"name": "sim-0", "kind": "sglang", "url": sim.url}])
    try:
        async with running_server(settings) as url:
            yield url, sandboxes
    finally:
        sim.kill()


@pytest.mark.parametrize("service", [CODING_TRACE], indirect=True)
async def test_scripted_agent_writes_tests_fixes_and_finishes(service: tuple[str, Path]):
    url, sandboxes = service
    async with AsyncClient(base_url=url, api_key=KEY) as client:
        run = await client.runs.create("agent", input={"task": "Write add() with a test, make the test pass.",
                                                       "max_turns": 10})
        final = await client.runs.wait(run.id, timeout=60)
        assert final.status == "succeeded", final.error
        out = final.output
        assert out["stop_reason"] == "final_answer"
        assert out["answer"] == "Fixed add() in calc.py; the test passes."
        assert (out["turns"], out["tool_calls"], out["tool_errors"]) == (6, 6, 1)  # the first test run fails
        assert out["tools_used"] == {"write_file": 2, "shell": 2, "str_replace": 1, "final_answer": 1}
        assert out["usage"]["completion_tokens"] >= 180 and out["usage"]["cached_tokens"] > 0
        assert sorted(f["path"] for f in out["workspace"]) == ["calc.py", "test_calc.py"]

        steps = await client.runs.steps(run.id)
        assert [s.name for s in steps] == ["turn-0", "tool-0-0", "turn-1", "tool-1-0", "turn-2", "tool-2-0",
                                           "turn-3", "tool-3-0", "turn-4", "tool-4-0", "turn-5", "tool-5-0",
                                           "workspace-listing"]
        assert all(s.status == "completed" for s in steps)

        events = (await client.runs.events(run.id, limit=100)).data
        story = [(e.type, e.data.get("tool")) for e in events if e.type.startswith("agent.")]
        assert story[0] == ("agent.started", None) and story[-1] == ("agent.finished", None)
        tools = [e.data for e in events if e.type == "agent.tool"]
        assert [t["tool"] for t in tools] == ["write_file", "write_file", "shell", "str_replace", "shell",
                                              "final_answer"]
        failed_run, passed_run = tools[2], tools[4]
        assert not failed_run["ok"] and "AssertionError: add(2, 3) = -1" in failed_run["content"]
        assert passed_run["ok"] and "tests passed" in passed_run["content"]
        assert tools[3]["content"] == "replaced 1 occurrence in calc.py at line 2"
        turns = [e.data for e in events if e.type == "agent.turn"]
        assert [t["tool_calls"][0]["name"] for t in turns] == [t["tool"] for t in tools]

        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as http:
            assert (await http.get("/v1/programs")).json()["data"] == []  # released
            metrics = (await http.get("/metrics")).text
        assert 'orchestrator_tool_calls_total{outcome="ok",tool="shell"} 1.0' in metrics
        assert 'orchestrator_tool_calls_total{outcome="nonzero_exit",tool="shell"} 1.0' in metrics
        assert "orchestrator_scheduler_dispatches_total 6.0" in metrics
        assert not any(sandboxes.iterdir())  # the sandbox was collected


@pytest.mark.parametrize("service", [BAD_CALLS_TRACE], indirect=True)
async def test_bad_tool_calls_go_back_to_the_model(service: tuple[str, Path]):
    url, _ = service
    async with AsyncClient(base_url=url, api_key=KEY) as client:
        run = await client.runs.create("agent", input={"task": "Try things."})
        final = await client.runs.wait(run.id, timeout=60)
        assert final.status == "succeeded", final.error
        assert (final.output["stop_reason"], final.output["tool_errors"]) == ("final_answer", 4)
        tools = [e.data for e in (await client.runs.events(run.id)).data if e.type == "agent.tool"]
        assert [t["error"] for t in tools] == ["unknown_tool", "invalid_arguments", "tool_error", "tool_error", None]
        assert "Available tools: python, shell" in tools[0]["content"]
        assert "'content' is a required property" in tools[1]["content"]
        assert "outside" in tools[2]["content"] and "root:" not in tools[2]["content"]


@pytest.mark.parametrize("service", [SLOW_TOOL_TRACE], indirect=True)
async def test_cancel_kills_the_running_tool_and_collects_the_sandbox(service: tuple[str, Path]):
    url, sandboxes = service
    async with AsyncClient(base_url=url, api_key=KEY) as client:
        run = await client.runs.create("agent", input={"task": "Wait.", "sandbox": {"wall_s": 120}})
        for _ in range(200):  # until the tool's process runs
            if _processes_with("sleep 47.25"):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the tool never started")
        await client.runs.cancel(run.id)
        final = await client.runs.wait(run.id, timeout=20)
        assert final.status == "cancelled"
        for _ in range(100):
            if not _processes_with("sleep 47.25") and not any(sandboxes.iterdir()):
                break
            await asyncio.sleep(0.05)
        assert _processes_with("sleep 47.25") == []
        assert list(sandboxes.iterdir()) == []
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as http:
            assert (await http.get("/v1/programs")).json()["data"] == []


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmd and "pytest" not in cmd:
                found.append(int(pid))
    return found


def _sim_metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"sglang:{name}{{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}")


async def test_backend_choice_and_cancel_during_an_llm_call(tmp_path: Path):
    fast = _sim(tmp_path, "fast", CODING_TRACE)
    slow_trace = tmp_path / "slow.json"
    slow_trace.write_text(json.dumps({"turns": [{"output_tokens": 4000}]}))
    slow = SimServerProcess("--speed", "1", "--script", str(slow_trace)).start()
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/two.db", api_keys={KEY: "acme"},
                        log_json=False, worker_poll_seconds=0.1, sandbox_root=str(tmp_path / "sb"),
                        backends=[{"name": "fast", "kind": "sglang", "url": fast.url},
                                  {"name": "slow", "kind": "sglang", "url": slow.url}])
    try:
        async with running_server(settings) as url, AsyncClient(base_url=url, api_key=KEY) as client:
            # every call of a run that chose a backend goes there
            run = await client.runs.create("agent", input={"task": "Fix it.", "backend": "fast"})
            final = await client.runs.wait(run.id, timeout=60)
            assert final.status == "succeeded" and final.output["turns"] == 6
            assert (_sim_metric(fast.url, "num_requests_total"), _sim_metric(slow.url, "num_requests_total")) == \
                (6, 0)
            # a backend that is not configured: a clear failure, no call made
            bad = await client.runs.wait((await client.runs.create("agent", input={
                "task": "x", "backend": "gpu-9"})).id, timeout=30)
            assert bad.status == "failed" and bad.error["code"] == "unknown_backend"
            # cancel while the engine generates a long answer: the request is aborted there
            run = await client.runs.create("agent", input={"task": "Think.", "backend": "slow",
                                                           "max_tokens_per_turn": 4000})
            for _ in range(200):
                if _sim_metric(slow.url, "num_running_reqs") == 1:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the LLM call never started")
            await client.runs.cancel(run.id)
            assert (await client.runs.wait(run.id, timeout=20)).status == "cancelled"
            for _ in range(100):
                if _sim_metric(slow.url, "num_running_reqs") == 0:
                    break
                await asyncio.sleep(0.05)
            assert _sim_metric(slow.url, "num_running_reqs") == 0
            assert _sim_metric(slow.url, "num_aborted_requests_total") == 1
    finally:
        fast.kill()
        slow.kill()

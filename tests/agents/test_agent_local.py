"""The ``agent`` workflow on the local engine with the real SmolLM2-135M model: native calls are
decoded under the tools' grammar, so none is malformed; text calls (``tool_mode`` ``text``) are
not constrained and often are. Either way the loop finishes within its budgets."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import Settings
from orchestrator_sdk import AsyncClient
from tests.servers import running_server

pytestmark = pytest.mark.slow
KEY = "sk-local"


@pytest.mark.parametrize("tool_mode,tool_choice", [("auto", "required"), ("text", "auto")])
async def test_real_model_agent_finishes_within_budgets(tmp_path: Path, tool_mode: str, tool_choice: str):
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/a.db", api_keys={KEY: "t"}, log_json=False,
                        worker_poll_seconds=0.1, sandbox_root=str(tmp_path / "sb"),
                        backends=[{"name": "local", "kind": "local"}])
    budget = {"max_turns": 3, "max_tokens_per_turn": 48, "max_total_tokens": 6000, "time_budget_s": 120}
    async with running_server(settings) as url, AsyncClient(base_url=url, api_key=KEY, timeout=30) as client:
        run = await client.runs.create("agent", input={
            "task": "List the files in the workspace, then answer with final_answer.",
            "files": {"notes.txt": "remember the milk\n"}, "tool_mode": tool_mode, "tool_choice": tool_choice,
            "stop_on_text_reply": False, **budget})
        final = await client.runs.wait(run.id, timeout=300)
        assert final.status == "succeeded", final.error
        out = final.output
        assert out["stop_reason"] in {"final_answer", "max_turns", "token_budget", "time_budget"}
        assert 1 <= out["turns"] <= budget["max_turns"]
        assert out["usage"]["completion_tokens"] <= budget["max_turns"] * budget["max_tokens_per_turn"]
        # the overshoot past the token budget is at most one turn
        assert out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"] < budget["max_total_tokens"] + 3000
        assert out["usage"]["cached_tokens"] > 0 or out["turns"] == 1  # later turns reuse the cached prefix
        assert {"path": "notes.txt", "size": 18} in out["workspace"]
        steps = [s.name for s in await client.runs.steps(run.id)]
        assert steps[0] == "workspace" and steps[-1] == "workspace-listing"
        assert steps.count("turn-0") == 1 and sum(n.startswith("turn-") for n in steps) == out["turns"]
        events = (await client.runs.events(run.id, limit=100)).data
        assert sum(e.type == "agent.turn" for e in events) == out["turns"]
        assert sum(e.type == "agent.tool" for e in events) == out["tool_calls"]
        if tool_mode == "auto":  # tool_choice "required": every turn is a call, and a valid one
            assert out["tool_calls"] >= out["turns"]
            # only a call cut by max_tokens (48 here) can be malformed: the grammar allows nothing else
            cut = {e.data["turn"] for e in events if e.type == "agent.turn" and e.data["finish_reason"] == "length"}
            errors = [e.data["error"] for e in events if e.type == "agent.tool" and e.data["turn"] not in cut]
            assert not {"malformed_arguments", "invalid_arguments", "unknown_tool"} & set(errors), errors

"""The ``pipeline`` workflow on the local engine with the real SmolLM2-135M model and its real
tokenizer and chat template: the aggregator's growing conversation keeps its token prefix, so
each round's re-prefill is served from the engine's prefix cache; and with chunks larger than
every output, staircase writes the same answer as wait (greedy decoding)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import Settings
from orchestrator_sdk import AsyncClient
from tests.servers import running_server

pytestmark = pytest.mark.slow
KEY = "sk-local"
PROMPTS = ("You are a concise engineer.", "You give one example.", "You answer in a numbered list.")


def spec(mode: str, chunk: int) -> dict:
    return {"task": "Name two uses of a hash map.", "mode": mode, "temperature": 0, "chunk_tokens": chunk,
            "layers": [{"agents": [{"system_prompt": p} for p in PROMPTS], "max_tokens": 24}],
            "aggregator": {"max_tokens": 24}, "stall_timeout_s": 120}


async def test_real_model_staircase_reuses_its_prefix_and_matches_wait(tmp_path: Path):
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/p.db", api_keys={KEY: "t"}, log_json=False,
                        worker_poll_seconds=0.1, sandbox_root=str(tmp_path / "sb"),
                        backends=[{"name": "local", "kind": "local"}])
    async with running_server(settings) as url, AsyncClient(base_url=url, api_key=KEY, timeout=30) as client:
        run = await client.runs.create("pipeline", input={**spec("staircase", 4), "aggregator_chunk_tokens": 4})
        events = [e async for e in client.runs.stream(run.id)]
        final = await client.runs.get(run.id)
        assert final.status == "succeeded", final.error
        rounds = [e.data for e in events if e.type == "pipeline.round"]
        assert len(rounds) >= 2 and final.output["answer"].strip()
        assert "".join(e.data["text"] for e in events if e.type == "pipeline.delta") == final.output["answer"]
        for prev, cur in zip(rounds, rounds[1:]):
            # the whole previous request, and all but the edges of what the model wrote, come from the cache
            assert cur["cached_tokens"] >= prev["prompt_tokens"] + prev["completion_tokens"] - 3, (prev, cur)

        answers = {}
        for mode in ("wait", "staircase"):
            run = await client.runs.create("pipeline", input=spec(mode, 10_000))
            done = await client.runs.wait(run.id, timeout=300)
            assert done.status == "succeeded", done.error
            answers[mode] = done.output["answer"]
        assert answers["wait"] == answers["staircase"] and answers["wait"].strip()

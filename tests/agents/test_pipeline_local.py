"""The ``pipeline`` workflow on the local engine with the real SmolLM2-135M model and its real
tokenizer and chat template: the aggregator's growing conversation keeps its token prefix, so
each round's re-prefill is served from the engine's prefix cache; and with chunks larger than
every output, staircase writes the same answer as wait (greedy decoding). And the staircase
aggregator never starts its answer over (issue 19): not after it has ended its answer, and not in
a round asked to continue it."""

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
        # turn: the whole previous request and what the model wrote are the next round's prefix
        run = await client.runs.create("pipeline", input={**spec("staircase", 4), "aggregator_chunk_tokens": 4,
                                                          "continuation": "turn"})
        events = [e async for e in client.runs.stream(run.id)]
        final = await client.runs.get(run.id)
        assert final.status == "succeeded", final.error
        rounds = [e.data for e in events if e.type == "pipeline.round"]
        assert len(rounds) >= 2 and final.output["answer"].strip()
        assert "".join(e.data["text"] for e in events if e.type == "pipeline.delta") == final.output["answer"]
        for prev, cur in zip(rounds, rounds[1:]):
            # the whole previous request, and all but the edges of what the model wrote, come from the cache
            # (unless that round started the answer over: the prompt then holds only what was kept of it)
            wrote = prev["completion_tokens"] if prev["restart_chars"] == 0 else 0
            assert cur["cached_tokens"] >= prev["prompt_tokens"] + wrote - 3, (prev, cur)

        answers = {}
        for mode in ("wait", "staircase"):
            run = await client.runs.create("pipeline", input=spec(mode, 10_000))
            done = await client.runs.wait(run.id, timeout=300)
            assert done.status == "succeeded", done.error
            answers[mode] = done.output["answer"]
            if mode == "staircase":  # unset: auto, and the local engine continues an open turn
                assert done.output["continuation"] == "prefix"
        assert answers["wait"] == answers["staircase"] and answers["wait"].strip()


def starts_over(answer: str) -> bool:
    """Its opening (16 characters, whitespace collapsed) written again later."""
    text = " ".join(answer.split())
    return len(text) >= 32 and text.find(text[:16], 16) >= 0


def capital(mode: str, chunk: int, agg_chunk: int) -> dict:
    return {"task": "What is the capital of France?", "mode": mode, "temperature": 0, "chunk_tokens": chunk,
            "aggregator_chunk_tokens": agg_chunk, "stall_timeout_s": 120,
            "layers": [{"agents": [{"system_prompt": p} for p in PROMPTS], "max_tokens": 24}],
            "aggregator": {"max_tokens": 48}}


async def test_real_model_staircase_aggregator_does_not_start_over(tmp_path: Path):
    """Before the fix, chunks of 8 (aggregator rounds of 16) gave "The capital of France is
    Paris.The capital of France is Paris.": round 0 ended with the model's end of turn, round 1 was
    asked to continue and answered again. Chunks of 4 gave "The capital of FranceThe capital of
    France is Paris. ...": a round asked to continue began anew."""
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/p.db", api_keys={KEY: "t"}, log_json=False,
                        worker_poll_seconds=0.1, sandbox_root=str(tmp_path / "sb"),
                        backends=[{"name": "local", "kind": "local"}])
    async with running_server(settings) as url, AsyncClient(base_url=url, api_key=KEY, timeout=30) as client:
        wait = await client.runs.wait((await client.runs.create("pipeline", input=capital("wait", 8, 16))).id,
                                      timeout=300)
        assert wait.status == "succeeded", wait.error
        assert "Paris" in wait.output["answer"] and not starts_over(wait.output["answer"])
        for chunk, agg_chunk in ((8, 16), (4, 4)):
            run = await client.runs.create("pipeline", input=capital("staircase", chunk, agg_chunk)
                                           | {"continuation": "turn"})  # the continuation the guard is for
            events = [e async for e in client.runs.stream(run.id)]
            final = await client.runs.get(run.id)
            assert final.status == "succeeded", final.error
            answer = final.output["answer"]
            rounds = [e.data for e in events if e.type == "pipeline.round"]
            assert "".join(e.data["text"] for e in events if e.type == "pipeline.delta") == answer
            assert not starts_over(answer), (chunk, answer)
            # an end of turn ends the answer: only the last round may have one
            assert all(r["finish"] == "length" for r in rounds[:-1]), rounds
            if (chunk, agg_chunk) == (8, 16):
                # the model answered in round 0, as wait's aggregator did with every response in front of it
                assert answer == wait.output["answer"] and len(rounds) == 1 and rounds[0]["finish"] == "stop"
            else:
                # several rounds, and the one that began the answer anew had its repetition dropped
                assert len(rounds) >= 2 and any(r["restart_chars"] > 0 for r in rounds[1:]), rounds
                assert answer.startswith(wait.output["answer"][:21]) and "Paris" in answer


class Rounds:
    def __init__(self) -> None:
        self.rounds: list[dict] = []

    async def delta(self, round: int, text: str) -> None:
        return None

    async def agent(self, node: str, data: dict) -> None:
        return None

    async def round(self, data: dict) -> None:
        self.rounds.append(data)


async def test_real_model_prefix_continuation_goes_on_with_its_own_text():
    """Continuation ``prefix`` on SmolLM2 (the local engine renders ``continue_final_message`` as
    SGLang does): in the setting where ``turn`` made the model start over (chunks of 4), it
    continues its own text: no round repeats anything, and each round's prompt is served from the
    cache up to where it differs from the previous one."""
    from agents.pipeline_exec import PipelineExecutor
    from agents.pipeline_spec import PipelineInput
    from scheduler.local.engine import LocalEngine

    engine = LocalEngine()
    prompts: list[list[int]] = []

    def llm(node, request):
        if node.id == "agg":
            prompts.append(engine.encode(request))
        return engine.stream(request)

    rec = Rounds()
    try:
        result = await PipelineExecutor(PipelineInput(**capital("staircase", 4, 4), continuation="prefix"), llm,
                                        rec).run()
    finally:
        await engine.close()
    answer = result["answer"]
    assert "Paris" in answer and not starts_over(answer), answer
    assert len(rec.rounds) >= 2 and all(r["restart_chars"] == 0 for r in rec.rounds), rec.rounds
    assert all(r["finish"] == "length" for r in rec.rounds[:-1])
    for prev, cur, r in zip(prompts, prompts[1:], rec.rounds[1:], strict=False):
        shared = next((i for i, (a, b) in enumerate(zip(prev, cur, strict=False)) if a != b), min(len(prev), len(cur)))
        assert r["cached_tokens"] >= shared - 1, (shared, r)
        # the open turn: the request ends with the answer so far, not with an end of turn and a new header
        text = engine.tokenizer.decode(cur)
        assert not text.endswith("<|im_start|>assistant\n") and "<|im_end|>" not in text[-12:], text[-80:]
        assert any(text.endswith(answer[:k]) for k in range(8, len(answer) + 1)), text[-80:]

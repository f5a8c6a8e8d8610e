"""The ``pipeline`` workflow end to end: the real service on loopback, its worker and scheduler
runtime, and simulator servers in their own processes as the engines (one for the proposers, one
for the aggregator, one that stalls, one that breaks): tokens on the run's stream through the SDK,
cache hits on the aggregator's re-prefill, a stalled and a failing proposer, cancel."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import httpx
import pytest

from orchestrator import Settings
from orchestrator_sdk import AsyncClient
from tests.agents.test_agent_sim import _sim_metric
from tests.servers import SimServerProcess, running_server

pytestmark = pytest.mark.slow

KEY = "sk-pipe"
CHUNK = ["--chunked-script", "8,6"]  # 6 numbered chunks of 8 tokens: 48 tokens a proposer


@pytest.fixture(scope="module")
def sims() -> Iterator[dict[str, SimServerProcess]]:
    started: dict[str, SimServerProcess] = {}
    try:
        for name, args in {"prop": ["--speed", "2", *CHUNK], "agg": ["--speed", "2"],
                           # an aggregator that writes to each round's budget: the pseudo-word script
                           # ("agg") ends its answer before it, and an answer that ended gets no round more
                           "agg_long": ["--speed", "2", "--chunked-script", "8,50"],
                           # slow: still generating when the stall gets it dropped, so the abort shows
                           "stall": ["--speed", "0.05", *CHUNK, "--stall-after-tokens", "12"],
                           "fail": ["--speed", "2", *CHUNK, "--fail-after-tokens", "20"],
                           "slow": ["--speed", "0.5", "--preset", "llama-3.1-70b-h100-tp4"]}.items():
            started[name] = SimServerProcess(*args).start()
        yield started
    finally:
        for s in started.values():
            s.kill()


@pytest.fixture
async def client(tmp_path: Path, sims: dict[str, SimServerProcess]) -> AsyncIterator[AsyncClient]:
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/pipe.db", api_keys={KEY: "acme"},
                        log_json=False, worker_poll_seconds=0.1, sandbox_root=str(tmp_path / "sb"),
                        backends=[{"name": n, "kind": "sglang", "url": s.url} for n, s in sims.items()])
    async with running_server(settings) as url, AsyncClient(base_url=url, api_key=KEY, timeout=30) as c:
        yield c


def pipeline(mode: str = "staircase", proposers: tuple[str, ...] = ("prop", "prop", "prop"), **kw: Any) -> dict:
    return {"task": "Explain prefix caching.", "mode": mode, "temperature": 0, "chunk_tokens": 8,
            "layers": [{"agents": [{"backend": b} for b in proposers], "max_tokens": 64}],
            "aggregator": {"backend": "agg_long", "max_tokens": 48}, "stall_timeout_s": 1.5, **kw}


async def test_staircase_streams_the_aggregator_through_the_sdk_and_the_cache_serves_each_round(
        client: AsyncClient, sims: dict[str, SimServerProcess]):
    # turn: each round's re-prefill is the previous request and its answer, all cached
    run = await client.runs.create("pipeline", input=pipeline(aggregator_chunk_tokens=6, continuation="turn"))
    events = [e async for e in client.runs.stream(run.id)]
    final = await client.runs.get(run.id)
    assert final.status == "succeeded", final.error
    out = final.output
    deltas = [e.data for e in events if e.type == "pipeline.delta"]
    assert deltas and "".join(d["text"] for d in deltas) == out["answer"]
    rounds = [e.data for e in events if e.type == "pipeline.round"]
    assert len(rounds) == out["rounds"] >= 2 and rounds[-1]["final"] and not rounds[0]["final"]
    assert rounds[0]["taken"] and all(t >= 1 for t in rounds[0]["taken"])  # started on the first chunks
    assert rounds[0]["taken"] != [6, 6, 6]  # ...before the proposers had finished
    for prev, cur in zip(rounds, rounds[1:]):  # every re-prefill is served from the cache but the new text
        assert cur["cached_tokens"] >= prev["prompt_tokens"] + prev["completion_tokens"] - 2
        assert cur["prompt_tokens"] > prev["prompt_tokens"]
    agg = out["aggregator_usage"]
    assert agg["requests"] == out["rounds"] and agg["cached_tokens"] == sum(r["cached_tokens"] for r in rounds) > 0
    assert out["agents"]["p0.0"]["completion_tokens"] == 48 and out["stop_reason"] in ("finished", "max_tokens")
    assert [e.type for e in events][:1] == ["run.started"] or "pipeline.started" in [e.type for e in events]
    steps = [s.name for s in await client.runs.steps(run.id)]
    assert steps == [f"round-{r}" for r in range(out["rounds"])]
    agents = {e.data["agent"]: e.data["status"] for e in events if e.type == "pipeline.agent"}
    assert agents == {"p0.0": "finished", "p0.1": "finished", "p0.2": "finished"}
    started = next(e.data for e in events if e.type == "pipeline.started")
    assert started["programs"] == {n: f"{run.id}:{n}" for n in ("p0.0", "p0.1", "p0.2", "agg")}
    async with httpx.AsyncClient(base_url=str(client._http.base_url), headers={"Authorization": f"Bearer {KEY}"}) as h:
        assert (await h.get("/v1/programs")).json()["data"] == []  # every agent's program released
        metrics = (await h.get("/metrics")).text
    calls = sum(a["requests"] for a in out["agents"].values())
    assert f"orchestrator_scheduler_dispatches_total {float(calls)}" in metrics  # every call was scheduled


async def test_auto_continuation_is_prefix_on_sglang_backends(client: AsyncClient):
    """Unset, ``continuation`` is ``auto``: every backend here is SGLang's kind, which honours
    ``continue_final_message``, so the aggregator continues its open answer (``prefix``); each
    round's re-prefill is cached up to the parts that arrived before it."""
    run = await client.runs.create("pipeline", input=pipeline(aggregator_chunk_tokens=6))
    events = [e async for e in client.runs.stream(run.id)]
    final = await client.runs.get(run.id)
    assert final.status == "succeeded", final.error
    assert final.output["continuation"] == "prefix"
    assert next(e.data for e in events if e.type == "pipeline.started")["continuation"] == "prefix"
    deltas = [e.data for e in events if e.type == "pipeline.delta"]
    assert "".join(d["text"] for d in deltas) == final.output["answer"] and final.output["rounds"] >= 2
    rounds = [e.data for e in events if e.type == "pipeline.round"]
    for prev, cur in zip(rounds, rounds[1:]):
        # the answer so far (at most the aggregator's 48 tokens) comes last, open: the cache
        # serves the previous prompt up to it
        assert cur["cached_tokens"] >= prev["prompt_tokens"] - 48 - 4 > 0


async def test_wait_and_staircase_agree_when_a_chunk_holds_every_output(client: AsyncClient):
    answers = {}
    for mode in ("wait", "staircase"):
        # the pseudo-word script answers a prompt the same way every time (the chunked one draws by rid)
        run = await client.runs.create("pipeline", input=pipeline(mode, ("agg", "agg", "agg"), chunk_tokens=1000,
                                                                  aggregator={"backend": "agg", "max_tokens": 48}))
        final = await client.runs.wait(run.id, timeout=60)
        assert final.status == "succeeded", final.error
        answers[mode] = final.output["answer"]
        assert final.output["rounds"] == 1
        steps = [s.name for s in await client.runs.steps(run.id)]
        assert steps == (["layer-0", "aggregate"] if mode == "wait" else ["round-0"])
    assert answers["wait"] == answers["staircase"] and answers["wait"]


async def test_a_stalled_and_a_failing_proposer_do_not_stop_the_others(
        client: AsyncClient, sims: dict[str, SimServerProcess]):
    aborted = _sim_metric(sims["stall"].url, "num_aborted_requests_total")
    run = await client.runs.create("pipeline", input=pipeline(proposers=("prop", "stall", "fail")))
    final = await client.runs.wait(run.id, timeout=60)
    assert final.status == "succeeded", final.error
    out = final.output
    assert {k: out["agents"][k]["status"] for k in ("p0.0", "p0.1", "p0.2")} == \
        {"p0.0": "finished", "p0.1": "stalled", "p0.2": "failed"}
    events = (await client.runs.events(run.id, limit=200)).data
    rounds = [e.data for e in events if e.type == "pipeline.round"]
    assert rounds[0]["taken"][1] >= 1  # the stalled one's first chunk (8 of its 12 tokens) was used
    assert rounds[-1]["taken"][0] == 6  # the healthy one was read to its end
    info = {e.data["agent"]: e.data for e in events if e.type == "pipeline.agent"}
    assert "StreamInterrupted" in info["p0.2"]["error"] and "nothing for 1.5 s" in info["p0.1"]["error"]
    for _ in range(50):  # the stalled call was aborted on its engine
        if _sim_metric(sims["stall"].url, "num_aborted_requests_total") == aborted + 1:
            break
        await asyncio.sleep(0.05)
    assert _sim_metric(sims["stall"].url, "num_aborted_requests_total") == aborted + 1
    assert _sim_metric(sims["stall"].url, "num_running_reqs") == 0


async def test_cancel_mid_stream_aborts_every_call_on_the_engines(
        client: AsyncClient, sims: dict[str, SimServerProcess]):
    slow = sims["slow"].url
    before = _sim_metric(slow, "num_aborted_requests_total")
    spec = pipeline(proposers=("slow", "slow", "slow"), chunk_tokens=4, aggregator_chunk_tokens=2000,
                    stall_timeout_s=60)
    spec["layers"][0]["max_tokens"] = 4000
    spec["aggregator"] = {"backend": "slow", "max_tokens": 4000}
    run = await client.runs.create("pipeline", input=spec)
    async for event in client.runs.stream(run.id):
        if event.type == "pipeline.delta":  # the user is reading the aggregator's answer
            break
    assert _sim_metric(slow, "num_running_reqs") == 4  # three proposers and the aggregator
    await client.runs.cancel(run.id)
    assert (await client.runs.wait(run.id, timeout=20)).status == "cancelled"
    for _ in range(100):
        if _sim_metric(slow, "num_running_reqs") == 0:
            break
        await asyncio.sleep(0.05)
    assert _sim_metric(slow, "num_running_reqs") == 0
    assert _sim_metric(slow, "num_aborted_requests_total") == before + 4


async def test_bad_pipelines_are_rejected_with_422_and_nothing_is_written(client: AsyncClient):
    async with httpx.AsyncClient(base_url=str(client._http.base_url), headers={"Authorization": f"Bearer {KEY}"}) as h:
        for bad in ({"task": "x", "layers": []}, {"task": "x", "layers": [{"agents": [{}]}], "chunk_schedule": [0]},
                    {"task": "x", "layers": [{"agents": [{"temperature": 9}]}]},
                    {"task": "x", "layers": [{"agents": [{}]}], "mode": "fast"}):
            r = await h.post("/v1/runs", json={"workflow": "pipeline", "input": bad})
            assert r.status_code == 422 and r.json()["error"]["type"], r.text
        assert (await h.get("/v1/runs")).json()["data"] == []
    run = await client.runs.create("pipeline", input=pipeline(proposers=("gpu-9",)))
    final = await client.runs.wait(run.id, timeout=30)
    assert final.status == "failed" and final.error["code"] == "unknown_backend"

"""``/v1/batches`` end to end over real HTTP, on SQLite and on PostgreSQL + Redis: a batch is
written whole or not at all, its runs are ordinary runs, results come back in input order,
completions stream, cancel reaches every run, another tenant sees nothing. The token test runs
``agent`` trajectories on the real SmolLM2 model (the local engine: the one backend that returns
prompt and completion token ids, see docs/api.md)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from orchestrator import Settings
from orchestrator.runs.batches import trajectory
from orchestrator_sdk import AsyncClient, Client, NotFoundError, UnprocessableEntityError
from tests.servers import running_server

A = {"Authorization": "Bearer sk-test-a"}
B = {"Authorization": "Bearer sk-test-b"}
JSONL = {"Content-Type": "application/jsonl"}


def E(message: Any) -> dict[str, Any]:
    """An ``echo`` input."""
    return {"message": message}


@pytest.fixture
async def url(make_settings):
    async with running_server(make_settings()) as base:
        yield base


@pytest.fixture
async def client(url: str):
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        yield c


async def row_counts(database_url: str) -> tuple[int, int, int, int]:
    """Rows of batches, batch_runs, runs and run_events, read straight from the database."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            return tuple([(await conn.execute(text(f"SELECT count(*) FROM {t}"))).scalar_one()  # type: ignore[return-value]
                          for t in ("batches", "batch_runs", "runs", "run_events")])
    finally:
        await engine.dispose()


async def results(c: httpx.AsyncClient, batch_id: str, headers: dict[str, str] = A) -> list[dict[str, Any]]:
    r = await c.get(f"/v1/batches/{batch_id}/results", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/jsonl")
    return [json.loads(line) for line in r.text.splitlines()]


async def wait_batch(c: httpx.AsyncClient, batch_id: str, within: float = 30) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        batch = (await c.get(f"/v1/batches/{batch_id}", headers=A)).json()
        if batch["status"] in ("completed", "cancelled") or asyncio.get_running_loop().time() > deadline:
            return batch
        await asyncio.sleep(0.1)


async def test_jsonl_batch_runs_every_line_and_returns_results_in_input_order(client: httpx.AsyncClient):
    lines = [{"message": f"line {i}"} for i in range(5)]
    body = "\n".join(json.dumps(x) for x in lines) + "\n\n"  # a trailing blank line is no request
    r = await client.post("/v1/batches", params={"workflow": "echo", "return_tokens": "true", "priority": "2"},
                          content=body, headers={**A, **JSONL})
    assert r.status_code == 201, r.text
    batch = r.json()
    assert batch["return_tokens"] is True
    assert r.headers["location"] == f"/v1/batches/{batch['id']}"
    assert (batch["object"], batch["workflow"], batch["counts"]["total"]) == ("batch", "echo", 5)
    assert batch["status"] == "in_progress" or batch["counts"]["succeeded"] == 5

    done = await wait_batch(client, batch["id"])
    assert done["status"] == "completed"
    assert done["counts"] == {"total": 5, "queued": 0, "running": 0, "waiting": 0, "cancelling": 0,
                              "succeeded": 5, "failed": 0, "cancelled": 0, "timed_out": 0}
    out = await results(client, batch["id"])
    assert [x["index"] for x in out] == [0, 1, 2, 3, 4]
    assert [x["output"] for x in out] == [x["message"] for x in lines]  # echo: the order is the input's
    # echo has no LLM turns: asked for tokens, each result says why it has none
    assert all(x["status"] == "succeeded" and x["token_ids"] is None for x in out)
    assert {x["tokens_error"] for x in out} == {"no completed LLM turns"}
    # each line is an ordinary run, labelled with its batch and position
    run = (await client.get(f"/v1/runs/{out[3]['run_id']}", headers=A)).json()
    assert run["metadata"]["batch"] == {"id": batch["id"], "index": 3, "return_tokens": True}
    assert run["priority"] == 2
    assert run["input"] == lines[3]


async def test_json_envelope_metadata_and_listing(client: httpx.AsyncClient):
    r = await client.post("/v1/batches", json={"workflow": "echo", "requests": [E(1), E(2)], "metadata": {"exp": "a"},
                                               "priority": 3}, headers=A)
    assert r.status_code == 201, r.text
    batch = r.json()
    assert batch["metadata"] == {"exp": "a"}
    out = await results(client, (await wait_batch(client, batch["id"]))["id"])
    run = (await client.get(f"/v1/runs/{out[0]['run_id']}", headers=A)).json()
    assert (run["priority"], run["metadata"]["exp"]) == (3, "a")
    listed = (await client.get("/v1/batches", headers=A)).json()
    assert [b["id"] for b in listed["data"]] == [batch["id"]]
    assert (await client.get("/v1/batches", headers=B)).json()["data"] == []


@pytest.mark.parametrize("body,line,code,status", [
    ('{"message": "ok"}\n{"message": "ok"}\n{"message": \n', 3, "invalid_json", 400),
    ('{"message": "ok"}\n\n{"message": NaN}\n', 3, "invalid_json", 400),
    ('{"message": "ok"}\n{"message": "a\\u0000b"}\n', 2, "unsupported_value", 422),
])
async def test_a_bad_jsonl_line_refuses_the_whole_batch_naming_it(client: httpx.AsyncClient, make_settings,
                                                                   body: str, line: int, code: str, status: int):
    r = await client.post("/v1/batches", params={"workflow": "echo"}, content=body, headers={**A, **JSONL})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["param"].startswith(f"line {line}")
    assert f"Line {line}" in err["message"]
    assert await row_counts(make_settings().database_url) == (0, 0, 0, 0)


async def test_an_invalid_input_refuses_the_whole_batch_and_writes_nothing(client: httpx.AsyncClient, make_settings):
    body = "\n".join(json.dumps(x) for x in [{"steps": 1}, {"steps": 2}, {"steps": "three"}, {"steps": 1}])
    r = await client.post("/v1/batches", params={"workflow": "demo"}, content=body, headers={**A, **JSONL})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("invalid_input", "line 3.steps")
    assert err["message"].startswith("Line 3: invalid input for workflow 'demo'")
    # the JSON form names the request's position
    r = await client.post("/v1/batches", json={"workflow": "demo", "requests": [{"steps": 1}, {"steps": -5}]},
                          headers=A)
    assert r.status_code == 422 and r.json()["error"]["param"] == "requests[1].steps", r.text
    # an agent line above its tenant's sandbox ceiling (the check POST /v1/runs makes too)
    r = await client.post("/v1/batches", json={"requests": [{"task": "a"}, {"task": "b", "sandbox": {"cpu_s": 10**6}}]},
                          headers=A)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"].startswith("requests[1]")
    assert await row_counts(make_settings().database_url) == (0, 0, 0, 0)


async def test_limits_and_refusals(make_settings):
    settings = make_settings(max_batch_requests=3, max_batch_line_bytes=64,
                             tenant_limits={"tenant-a": {"max_concurrent_runs": 4}})
    async with running_server(settings) as base, httpx.AsyncClient(base_url=base, timeout=30) as c:
        r = await c.post("/v1/batches", json={"workflow": "echo", "requests": [E(1), E(2), E(3), E(4)]}, headers=A)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "batch_too_large")
        r = await c.post("/v1/batches", content='{"x": "' + "y" * 100 + '"}\n', params={"workflow": "echo"},
                         headers={**A, **JSONL})
        assert (r.status_code, r.json()["error"]["param"]) == (413, "line 1")
        r = await c.post("/v1/batches", json={"workflow": "echo", "requests": []}, headers=A)
        assert (r.status_code, r.json()["error"]["param"]) == (422, "requests")
        r = await c.post("/v1/batches", json={"workflow": "nope", "requests": [E(1)]}, headers=A)
        assert r.json()["error"]["code"] == "unknown_workflow"
        r = await c.post("/v1/batches", content='{"message": 1}\n', params={"workflow": "echo"},
                         headers={**A, "Content-Type": "text/csv"})
        assert (r.status_code, r.json()["error"]["code"]) == (415, "unsupported_media_type")
        r = await c.post("/v1/batches", content='{"message": 1}\n', headers={**A, **JSONL},
                         params={"workflow": "echo", "priority": "often"})
        assert (r.status_code, r.json()["error"]["param"]) == (422, "priority")  # the query's options are checked
        r = await c.post("/v1/batches", content="", params={"workflow": "echo"}, headers={**A, **JSONL})
        assert (r.status_code, r.json()["error"]["param"]) == (422, "requests")
        r = await c.post("/v1/batches", json={"requests": [E(1)]}, params={"workflow": "echo"}, headers=A)
        assert (r.status_code, r.json()["error"]["param"]) == (422, "workflow")  # query options: JSONL only
        r = await c.post("/v1/batches", json={"workflow": "echo", "requests": [E(1)], "metadata": {"batch": 1}},
                         headers=A)
        assert (r.status_code, r.json()["error"]["param"]) == (422, "metadata.batch")
        # the tenant's quota counts every run of a batch: 3 sleeping runs + 2 more is over 4
        r = await c.post("/v1/batches", json={"workflow": "sleep", "requests": [{"seconds": 30}] * 3}, headers=A)
        assert r.status_code == 201, r.text
        r = await c.post("/v1/batches", json={"workflow": "echo", "requests": [E(1), E(2)]}, headers=A)
        assert (r.status_code, r.json()["error"]["code"]) == (429, "too_many_concurrent_runs")
        assert "retry-after" in r.headers
        assert (await row_counts(settings.database_url))[:3] == (1, 3, 3)  # the refused batch wrote nothing


async def test_idempotency_key_replays_the_batch(client: httpx.AsyncClient, make_settings):
    key = {"Idempotency-Key": "batch-key-1"}
    first = await client.post("/v1/batches", content='{"message": 1}\n{"message": 2}\n', params={"workflow": "echo"},
                              headers={**A, **JSONL, **key})
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    # the same batch in its JSON form is the same request
    again = await client.post("/v1/batches", json={"workflow": "echo", "requests": [E(1), E(2)]}, headers={**A, **key})
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    other = await client.post("/v1/batches", json={"workflow": "echo", "requests": [E(1), E(3)]}, headers={**A, **key})
    assert (other.status_code, other.json()["error"]["code"]) == (409, "idempotency_key_reused")
    # the key is the tenant's own: another tenant using it makes its own batch
    theirs = await client.post("/v1/batches", json={"workflow": "echo", "requests": [E(1), E(2)]}, headers={**B, **key})
    assert theirs.status_code == 201 and theirs.json()["id"] != first.json()["id"]
    assert (await row_counts(make_settings().database_url))[:3] == (2, 4, 4)


async def test_concurrent_submissions_with_one_key_make_one_batch(client: httpx.AsyncClient, make_settings):
    body = {"workflow": "echo", "requests": [E(i) for i in range(20)]}
    answers = await asyncio.gather(*[client.post("/v1/batches", json=body, headers={**A, "Idempotency-Key": "k"})
                                     for _ in range(4)])
    assert [r.status_code for r in answers] == [201] * 4
    assert len({r.json()["id"] for r in answers}) == 1
    assert sum("idempotent-replayed" in r.headers for r in answers) == 3
    assert (await row_counts(make_settings().database_url))[:3] == (1, 20, 20)


async def test_another_tenants_batch_is_not_found(client: httpx.AsyncClient):
    batch = (await client.post("/v1/batches", json={"workflow": "echo", "requests": [E(1)]}, headers=A)).json()
    for method, path in [("GET", ""), ("GET", "/results"), ("GET", "/events"), ("POST", "/cancel")]:
        r = await client.request(method, f"/v1/batches/{batch['id']}{path}", headers=B)
        assert (r.status_code, r.json()["error"]["code"]) == (404, "batch_not_found"), (method, path)
    r = await client.get("/v1/batches/batch_nope", headers=A)
    assert r.status_code == 404
    assert (await client.get(f"/v1/batches/{batch['id']}", headers=A)).status_code == 200


async def test_cancel_stops_queued_and_running_runs_and_keeps_finished_ones(client: httpx.AsyncClient):
    batch = (await client.post("/v1/batches", json={"workflow": "sleep", "requests": [{"seconds": 60}] * 4},
                               headers=A)).json()
    # wait for at least one to be running, so both kinds of cancel happen
    for _ in range(100):
        counts = (await client.get(f"/v1/batches/{batch['id']}", headers=A)).json()["counts"]
        if counts["running"] + counts["waiting"]:
            break
        await asyncio.sleep(0.05)
    r = await client.post(f"/v1/batches/{batch['id']}/cancel", headers=A)
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")
    done = await wait_batch(client, batch["id"], within=20)
    assert done["status"] == "cancelled" and done["counts"]["cancelled"] == 4, done
    again = await client.post(f"/v1/batches/{batch['id']}/cancel", headers=A)
    assert again.json()["counts"]["cancelled"] == 4  # idempotent
    out = await results(client, batch["id"])
    assert [x["status"] for x in out] == ["cancelled"] * 4
    assert all(x["error"]["code"] == "cancelled" for x in out)
    ev = (await client.get(f"/v1/runs/{out[0]['run_id']}/events", headers=A)).json()["data"]
    assert ev[-1]["type"] == "run.cancelled"  # each run's own log says it


async def test_events_stream_each_completion_then_the_end_and_resume(client: httpx.AsyncClient):
    batch = (await client.post("/v1/batches", json={"workflow": "sleep",
                                                    "requests": [{"seconds": 0.2 * (i + 1)} for i in range(3)]},
                               headers=A)).json()
    frames = await sse(client, batch["id"])
    finished = [f for f in frames if f[1] == "batch.run_finished"]
    assert sorted(f[2]["index"] for f in finished) == [0, 1, 2]
    assert [f[2]["status"] for f in finished] == ["succeeded"] * 3
    assert frames[-1][1] == "batch.finished" and frames[-1][2]["counts"]["succeeded"] == 3
    # resumed after the last completion: nothing earlier than the grace window is sent twice;
    # what comes again is at most the runs that finished in it, then the end
    resumed = await sse(client, batch["id"], last_event_id=finished[-1][0])
    assert finished[-1][2]["index"] not in [f[2]["index"] for f in resumed if f[1] == "batch.run_finished"]
    assert resumed[-1][1] == "batch.finished"
    r = await client.get(f"/v1/batches/{batch['id']}/events", headers={**A, "Last-Event-ID": "nonsense"})
    assert r.status_code == 422
    # without Accept: text/event-stream, the same events as one JSON list, at once
    page = (await client.get(f"/v1/batches/{batch['id']}/events", headers=A)).json()
    assert page["object"] == "list" and page["finished"] is True
    assert sorted(e["index"] for e in page["data"] if e["type"] == "batch.run_finished") == [0, 1, 2]
    assert page["data"][-1]["type"] == "batch.finished" and page["data"][-1]["counts"]["succeeded"] == 3
    # a bare time in ms resumes from then: 0 is the whole stream again
    again = await sse(client, batch["id"], last_event_id="0")
    assert sorted(f[2]["index"] for f in again if f[1] == "batch.run_finished") == [0, 1, 2]


async def sse(c: httpx.AsyncClient, batch_id: str, last_event_id: str | None = None
              ) -> list[tuple[str | None, str, dict[str, Any]]]:
    headers = {**A, "Accept": "text/event-stream"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    out: list[tuple[str | None, str, dict[str, Any]]] = []
    ev_id = event = None
    async with c.stream("GET", f"/v1/batches/{batch_id}/events", headers=headers) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("id: "):
                ev_id = line[4:]
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                assert event is not None
                out.append((ev_id, event, json.loads(line[6:])))
                ev_id = event = None
    return out


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_sdk_sync_and_async(url: str):
    async with AsyncClient(base_url=url, api_key="sk-test-a") as ac:
        batch = await ac.batches.create([{"message": "a"}, {"message": "b"}], workflow="echo",
                                        metadata={"k": "v"})
        seen = [e async for e in ac.batches.stream(batch.id)]
        assert sorted(e.index for e in seen if e.index is not None) == [0, 1]
        assert seen[-1].type == "batch.finished"
        got = await ac.batches.get(batch.id)
        assert got.status == "completed" and got.counts.succeeded == 2
        out = await ac.batches.results(batch.id)
        assert [x.output for x in out] == ["a", "b"]
        with pytest.raises(UnprocessableEntityError):
            await ac.batches.create([], workflow="echo")

    def sync_client() -> None:  # in a thread: the service runs on this test's event loop
        with Client(base_url=url, api_key="sk-test-b") as c:
            with pytest.raises(NotFoundError):
                c.batches.get(batch.id)
            mine = c.batches.create([{"seconds": 30}], workflow="sleep")
            assert c.batches.cancel(mine.id).status in ("cancelling", "cancelled")
            assert [e.type for e in c.batches.stream(mine.id)][-1] == "batch.finished"
            assert [x.status for x in c.batches.results(mine.id)] == ["cancelled"]
            assert c.batches.wait(mine.id, timeout=10).status == "cancelled"

    await asyncio.to_thread(sync_client)


def test_trajectory_concatenates_turns_and_masks_what_the_model_generated():
    turns = [
        {"tokens": {"prompt_ids": [1, 2, 3], "completion_ids": [10, 11], "completion_logprobs": [-0.1, -0.2],
                    "completion_mask": [1, 1]}},
        # the next prompt holds the whole sequence so far, then a tool result (5, 6)
        {"tokens": {"prompt_ids": [1, 2, 3, 10, 11, 5, 6], "completion_ids": [12, 13, 14],
                    "completion_logprobs": [-0.3, None, -0.5], "completion_mask": [1, 0, 1]}},
    ]
    out, why = trajectory(turns)
    assert why is None and out is not None
    assert out["token_ids"] == [1, 2, 3, 10, 11, 5, 6, 12, 13, 14]
    assert out["loss_mask"] == [0, 0, 0, 1, 1, 0, 0, 1, 0, 1]
    assert out["logprobs"] == [None, None, None, -0.1, -0.2, None, None, -0.3, None, -0.5]
    assert out["retokenized_turns"] == []
    # a later prompt that re-rendered the earlier completion in other tokens: appended whole, said
    turns[1]["tokens"]["prompt_ids"] = [1, 2, 3, 99, 5, 6]
    out, _ = trajectory(turns)
    assert out is not None and out["retokenized_turns"] == [1] and len(out["token_ids"]) == 3 + 2 + 6 + 3
    assert trajectory([{"tokens": {"prompt_ids": None, "completion_ids": [], "completion_logprobs": [],
                                   "completion_mask": []}, "usage": {"completion_tokens": 4}}])[0] is None
    assert trajectory([]) == (None, "no completed LLM turns")


@pytest.mark.slow
async def test_agent_rollouts_return_token_ids_logprobs_and_loss_mask(tmp_path: Path):
    """Three ``agent`` trajectories on the real SmolLM2 (the local engine), two turns each: the
    results carry one token sequence per trajectory whose masked-in tokens are exactly the
    completions the engine generated, each with its logprob."""
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/b.db", api_keys={"sk-test-a": "t"},
                        log_json=False, worker_poll_seconds=0.1, sandbox_root=str(tmp_path / "sb"),
                        backends=[{"name": "local", "kind": "local"}])
    line = {"task": "Say hello.", "tool_mode": "text", "stop_on_text_reply": False, "max_turns": 2,
            "max_tokens_per_turn": 6, "tools": ["final_answer"], "time_budget_s": 240}
    async with running_server(settings) as base, AsyncClient(base_url=base, api_key="sk-test-a", timeout=60) as ac:
        batch = await ac.batches.create([{**line, "seed": i} for i in range(3)], return_tokens=True)
        assert batch.return_tokens
        done = await ac.batches.wait(batch.id, timeout=400)
        assert done.status == "completed" and done.counts.succeeded == 3, done
        out = await ac.batches.results(batch.id)
        assert [x.index for x in out] == [0, 1, 2]
        for x in out:
            assert x.tokens_error is None, x.tokens_error
            assert x.token_ids and len(x.token_ids) == len(x.logprobs) == len(x.loss_mask)
            steps = [s for s in await ac.runs.steps(x.run_id) if s.name.startswith("turn-")]
            generated = [t for s in steps for t in s.output["tokens"]["completion_ids"]]
            assert sum(s.output["usage"]["completion_tokens"] for s in steps) == len(generated)
            # masked-in tokens are the completions, in order, each with a logprob; the rest have none
            assert [t for t, m in zip(x.token_ids, x.loss_mask, strict=True) if m] == generated
            assert all((lp is not None) == bool(m) for lp, m in zip(x.logprobs, x.loss_mask, strict=True))
            assert all(lp <= 0 for lp in x.logprobs if lp is not None)
            # the first turn's prompt opens the sequence, and it is no generated token
            first = steps[0].output["tokens"]
            assert x.token_ids[: len(first["prompt_ids"])] == first["prompt_ids"]
            assert not any(x.loss_mask[: len(first["prompt_ids"])])
            if not x.retokenized_turns:  # one context: the last prompt plus its completion is the whole
                last = steps[-1].output["tokens"]
                assert x.token_ids == last["prompt_ids"] + last["completion_ids"]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_cli_submits_a_jsonl_file_and_writes_results(url: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]):
    from orchestrator.cli import main

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"message": "x"}\n{"message": "y"}\n')
    base = ["--base-url", url, "--api-key", "sk-test-a", "batches"]
    assert await asyncio.to_thread(main, [*base, "submit", str(src), "--workflow", "echo", "--follow",
                                          "--results", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    batch_id = printed[0].split()[0]
    assert printed[0].endswith("runs=2") and printed[-1].startswith("batch.finished completed")
    assert [json.loads(line)["output"] for line in out.read_text().splitlines()] == ["x", "y"]
    assert await asyncio.to_thread(main, [*base, "get", batch_id]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["succeeded"] == 2
    src.write_text('{"message": "x"}\n{"message": \n')
    assert await asyncio.to_thread(main, [*base, "submit", str(src)]) == 2
    assert "line 2" in capsys.readouterr().err


def test_token_record_masks_tokens_a_grammar_forced():
    """The local engine returns one logprob per sampled token; the tokens a tool-call grammar
    forced after it have none: not sampled, so mask 0 and no logprob."""
    from agents.loop import token_record
    from scheduler.backends.base import Generation, TokenLogprob, Usage

    gen = Generation(rid="r", text="x", token_ids=[5, 6, 7, 8], finish_reason="stop", usage=Usage(),
                     logprobs=[TokenLogprob(token="a", token_id=5, logprob=-0.5),
                               TokenLogprob(token="d", token_id=8, logprob=-0.25)])
    rec = token_record(gen, [1, 2])
    assert rec == {"prompt_ids": [1, 2], "completion_ids": [5, 6, 7, 8], "completion_logprobs": [-0.5, None, None, -0.25],
                   "completion_mask": [1, 0, 0, 1]}
    # one logprob per token: all sampled, in order
    gen = gen.model_copy(update={"token_ids": [5, 8]})
    assert token_record(gen, None)["completion_mask"] == [1, 1]


@pytest.mark.slow
async def test_rollouts_on_sglang_chat_say_why_they_have_no_tokens(tmp_path: Path):
    """The simulator's SGLang-compatible server, as an ``sglang`` backend: the chat API returns
    logprobs but no token ids, so each result says so instead of giving a wrong sequence."""
    from tests.servers import SimServerProcess

    script = tmp_path / "trace.json"
    script.write_text(json.dumps({"turns": [
        {"output_tokens": 12, "tool": "final_answer", "arguments": {"answer": "done"}}]}))
    sim = SimServerProcess("--speed", "50", "--script", str(script)).start()
    try:
        settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/s.db", api_keys={"sk-test-a": "t"},
                            log_json=False, worker_poll_seconds=0.1, sandbox_root=str(tmp_path / "sb"),
                            backends=[{"name": "sim-0", "kind": "sglang", "url": sim.url}])
        async with running_server(settings) as base, AsyncClient(base_url=base, api_key="sk-test-a") as ac:
            batch = await ac.batches.create([{"task": "t"}, {"task": "u"}], return_tokens=True)
            assert (await ac.batches.wait(batch.id, timeout=60)).counts.succeeded == 2
            out = await ac.batches.results(batch.id)
            assert [x.output["answer"] for x in out] == ["done", "done"]
            assert [x.tokens_error for x in out] == ["the backend of turn 0 returned no token ids"] * 2
            assert all(x.token_ids is None and x.loss_mask is None for x in out)
            # the turn recorded its tokens as unknown, not as an empty sequence
            turn = next(s for s in await ac.runs.steps(out[0].run_id) if s.name == "turn-0")
            assert turn.output["tokens"]["prompt_ids"] is None and turn.output["tokens"]["completion_ids"] == []
            assert turn.output["usage"]["completion_tokens"] > 0
    finally:
        sim.kill()

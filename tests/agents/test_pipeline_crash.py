"""Crash: SIGKILL the service while a staircase pipeline streams; a new process recovers the run,
replays the aggregator's finished rounds from their checkpoints (not asked again: the simulator
counts requests), re-uses the output of a proposer that had finished, restarts the ones that were
still streaming, and the aggregator appends from where it was."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.agents.test_agent_sim import _sim_metric
from tests.servers import ServiceProcess, SimServerProcess

pytestmark = pytest.mark.slow
A = {"Authorization": "Bearer sk-crash"}


def _events(url: str, run_id: str) -> list[dict]:
    return httpx.get(f"{url}/v1/runs/{run_id}/events", headers=A, params={"limit": 1000}).json()["data"]


def test_sigkill_mid_pipeline_resumes_from_the_last_round(tmp_path: Path):
    sims = {"prop": SimServerProcess("--speed", "0.2", "--chunked-script", "8,12").start(),
            "short": SimServerProcess("--speed", "0.2", "--chunked-script", "8,1").start(),
            # writes to each round's budget (an aggregator that ends its answer gets no round more)
            "agg": SimServerProcess("--speed", "0.2", "--chunked-script", "8,60").start()}
    env = {"ORCH_API_KEYS": "sk-crash=t", "ORCH_LEASE_SECONDS": "2", "ORCH_HEARTBEAT_SECONDS": "0.4",
           "ORCH_WORKER_POLL_SECONDS": "0.2", "ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/orch.db",
           "ORCH_SANDBOX_ROOT": str(tmp_path / "sandboxes"),
           "ORCH_BACKENDS": json.dumps([{"name": n, "kind": "sglang", "url": s.url} for n, s in sims.items()])}
    spec = {"task": "Explain.", "mode": "staircase", "temperature": 0, "chunk_tokens": 8,
            "aggregator_chunk_tokens": 8, "stall_timeout_s": 30,
            "layers": [{"agents": [{"backend": "prop"}, {"backend": "short"}, {"backend": "prop"}],
                        "max_tokens": 200}], "aggregator": {"backend": "agg", "max_tokens": 400}}
    first = ServiceProcess(env, tmp_path / "first.log").start()
    second = None
    try:
        body = {"workflow": "pipeline", "input": spec}
        run_id = httpx.post(f"{first.url}/v1/runs", headers=A, json=body).json()["id"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rounds = [e for e in _events(first.url, run_id) if e["type"] == "pipeline.round"]
            if len(rounds) >= 3 and any(e["type"] == "pipeline.agent" for e in _events(first.url, run_id)):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the pipeline did not get through 3 rounds")
        first.kill()
        time.sleep(0.5)
        agg_before = _sim_metric(sims["agg"].url, "num_requests_total")  # finished rounds + the one cut off
        assert _sim_metric(sims["agg"].url, "num_running_reqs") == 0  # the cut-off round was aborted
        assert _sim_metric(sims["short"].url, "num_requests_total") == 1
        second = ServiceProcess(env, tmp_path / "second.log").start()
        final = httpx.get(f"{second.url}/v1/runs/{run_id}", headers=A, params={"wait": 60}, timeout=90).json()
        assert final["status"] == "succeeded", final
        out = final["output"]
        events = _events(second.url, run_id)
        assert "run.recovered" in [e["type"] for e in events]
        rounds = [e["data"] for e in events if e["type"] == "pipeline.round"]
        before = [r for r in rounds if r["attempt"] == 1]
        after = [r for r in rounds if r["attempt"] == 2]
        assert len(before) >= 3 and after and [r["round"] for r in rounds] == list(range(out["rounds"]))
        # the finished rounds were not asked again; the cut-off one and the rest were
        assert _sim_metric(sims["agg"].url, "num_requests_total") == agg_before + len(after)
        assert agg_before in (len(before), len(before) + 1)  # + 1 when a round was being written
        assert _sim_metric(sims["short"].url, "num_requests_total") == 1  # its output came from the checkpoint
        assert _sim_metric(sims["prop"].url, "num_requests_total") == 4  # two ran, were cut off, ran again
        steps = httpx.get(f"{second.url}/v1/runs/{run_id}/steps", headers=A).json()["data"]
        assert [s["name"] for s in steps] == [f"round-{r}" for r in range(out["rounds"])]
        assert [s["attempt"] for s in steps] == [1] * len(before) + [2] * len(after)
        # the answer is the rounds of attempt 1 followed by those of attempt 2: appended, never restarted
        def text(attempt: int, n: int) -> str:
            return "".join(e["data"]["text"] for e in events if e["type"] == "pipeline.delta"
                           and e["data"]["attempt"] == attempt and e["data"]["round"] < n)

        assert out["answer"].startswith(text(1, len(before))) and out["answer"].endswith(
            text(2, out["rounds"])) and len(text(1, len(before))) > 0
        assert out["answer"] == text(1, len(before)) + text(2, out["rounds"])
    finally:
        first.stop()
        if second is not None:
            second.stop()
        for s in sims.values():
            s.kill()

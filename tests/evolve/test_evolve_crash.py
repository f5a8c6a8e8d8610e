"""Crash: SIGKILL the service during loop 2 of an evolve run; a new process resumes the run at
loop 2 from the checkpoints of loops 0 and 1 (the simulators count every request, so a loop
called again would show) and finishes it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.evolve.helpers import Q, TRUTH, sim_metric, sim_model
from tests.servers import ServiceProcess

pytestmark = pytest.mark.slow
A = {"Authorization": "Bearer sk-crash"}
SLOW = ("--preset", "smollm2-135m-cpu", "--speed", "4")


def _requests(sims: dict) -> int:
    return int(sum(sim_metric(s.url, "num_requests_total") for s in sims.values()))


def _calls(ledger: dict) -> int:
    return sum(m["calls"] + m["scoring_calls"] for m in ledger["models"].values())


def test_sigkill_during_loop_2_resumes_at_loop_2(tmp_path: Path):
    sims = {"strong": sim_model(tmp_path, "strong", 0.6, 1, *SLOW, reasoning_tokens=20),
            "weak": sim_model(tmp_path, "weak", 0.2, 2, *SLOW, reasoning_tokens=20)}
    env = {"ORCH_API_KEYS": "sk-crash=t", "ORCH_LEASE_SECONDS": "2", "ORCH_HEARTBEAT_SECONDS": "0.4",
           "ORCH_WORKER_POLL_SECONDS": "0.1", "ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/orch.db",
           "ORCH_SANDBOX_ROOT": str(tmp_path / "sandboxes"),
           "ORCH_BACKENDS": json.dumps([{"name": n, "kind": "sglang", "url": s.url} for n, s in sims.items()])}
    spec = {"problems": [{"question": Q, "answer": TRUTH}], "population": 6, "k": 2, "loops": 4,
            "percentiles": [50], "lite_fraction": 0.3, "seed": 5,
            "models": [{"name": "strong", "price_in": 1, "price_out": 4, "max_tokens": 64},
                       {"name": "weak", "price_in": 0.1, "price_out": 0.2, "max_tokens": 64, "prompt_logprobs": True}]}
    first = ServiceProcess(env, tmp_path / "first.log").start()
    second = None
    try:
        run_id = httpx.post(f"{first.url}/v1/runs", headers=A, json={"workflow": "evolve", "input": spec}).json()["id"]
        deadline = time.monotonic() + 60
        seen: list[int] = []
        while time.monotonic() < deadline:
            events = httpx.get(f"{first.url}/v1/runs/{run_id}/events", headers=A, params={"limit": 100}).json()["data"]
            seen = [e["data"]["loop"] for e in events if e["type"] == "evolve.loop"]
            if 1 in seen:
                break
            time.sleep(0.02)
        assert seen == [0, 1], seen  # loop 1 is checkpointed, loop 2 has just started
        first.kill()
        time.sleep(0.3)
        at_kill = _requests(sims)

        second = ServiceProcess(env, tmp_path / "second.log").start()
        final = httpx.get(f"{second.url}/v1/runs/{run_id}", headers=A, params={"wait": 60}, timeout=90).json()
        assert final["status"] == "succeeded", final
        out = final["output"]
        loops = out["ledger"]["loops"]
        # after the kill: loops 2 and 3 and the final step in full, and nothing of loops 0 and 1 again
        assert _requests(sims) == at_kill + _calls(loops[2]) + _calls(loops[3]) + _calls(out["ledger"]["final"])
        partial = at_kill - _calls(loops[0]) - _calls(loops[1])
        assert 0 <= partial < _calls(loops[2])  # the interrupted loop 2 had made some of its calls
        steps = httpx.get(f"{second.url}/v1/runs/{run_id}/steps", headers=A).json()["data"]
        attempts = {s["name"]: s["attempt"] for s in steps}
        assert attempts == {"loop-0": 1, "loop-1": 1, "loop-2": 2, "loop-3": 2, "final": 2}
        events = httpx.get(f"{second.url}/v1/runs/{run_id}/events", headers=A, params={"limit": 100}).json()["data"]
        types = [e["type"] for e in events]
        assert "run.recovered" in types
        assert [e["data"]["loop"] for e in events if e["type"] == "evolve.loop"] == [0, 1, 2, 3]  # none twice
        assert len(out["answers"][0]["population"]) == 6 and out["ledger"]["total"]["cost_usd"] > 0
        # the totals still add up over the loops of both processes
        total = out["ledger"]["total"]
        assert total["models"]["strong"]["calls"] == sum(l["models"].get("strong", {}).get("calls", 0) for l in loops)
    finally:
        first.stop()
        if second is not None:
            second.stop()
        for s in sims.values():
            s.kill()

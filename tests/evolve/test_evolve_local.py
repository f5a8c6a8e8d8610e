"""The ``evolve`` workflow on the real SmolLM2-135M (the in-process local engine): its answers may
be poor, but the machinery must hold: real prompt logprobs rendered through the model's own chat
template give finite confidences, the routing follows them, the ledger adds up, one answer
comes back with the final population."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from orchestrator import Settings
from orchestrator_sdk import AsyncClient
from tests.evolve.helpers import expected_tiers
from tests.servers import running_server

pytestmark = pytest.mark.slow
KEY = "sk-local"


async def test_real_model_evolve_finishes_end_to_end(tmp_path: Path):
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/e.db", api_keys={KEY: "t"}, log_json=False,
                        worker_poll_seconds=0.1, sandbox_root=str(tmp_path / "sb"),
                        backends=[{"name": "local", "kind": "local"}])
    # two "models" on the one engine: a careful expensive one and a cheap sampler that also scores
    spec = {"problems": [{"question": "What is 2 + 3?", "answer": "5"}],
            "models": [{"name": "careful", "backend": "local", "temperature": 0.0, "max_tokens": 24,
                        "price_in": 1.0, "price_out": 2.0},
                       {"name": "cheap", "backend": "local", "temperature": 0.8, "max_tokens": 24,
                        "prompt_logprobs": True, "price_in": 0.1, "price_out": 0.2}],
            "population": 3, "k": 2, "groups": 3, "loops": 2, "percentiles": [40], "lite_fraction": 0.5,
            "seed": 3, "max_concurrency": 4}
    async with running_server(settings) as url, AsyncClient(base_url=url, api_key=KEY, timeout=30) as client:
        run = await client.runs.create("evolve", input=spec)
        final = await client.runs.wait(run.id, timeout=300)
        assert final.status == "succeeded", final.error
        steps = {s.name: s.output for s in await client.runs.steps(run.id)}
    out = final.output
    routing = steps["loop-1"]["routing"][0]
    assert len(routing["fitness"]) == 3 and all(math.isfinite(f) and f > 0 for f in routing["fitness"])
    assert ["lite" if t == -1 else f"m{t}" for t in routing["tiers"]] == expected_tiers(routing["fitness"], [40], 0.5)
    total = out["ledger"]["total"]
    cheap, careful = total["models"]["cheap"], total["models"]["careful"]
    assert careful["calls"] == 3 + steps["loop-1"]["routes"]["careful"]
    # loop 0's three candidates, each scored once after the initial prompt, plus that prompt's count;
    # loop 1 is the last, so its candidates are never scored
    assert cheap["scoring_calls"] == 3 + 1 and cheap["scoring_tokens"] > 3 * 20
    assert all(math.isfinite(c["confidence"]) for c in steps["loop-0"]["populations"][0])
    assert total["cost_usd"] == pytest.approx(sum(m["cost_usd"] for m in total["models"].values()))
    answer = out["answers"][0]
    assert len(answer["population"]) == 3 and all(c["text"] for c in answer["population"] if c["model"] != "lite")
    assert "answer" in answer and out["accuracy"] in (0.0, 1.0)

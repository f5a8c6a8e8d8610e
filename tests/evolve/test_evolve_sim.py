"""The ``evolve`` workflow end to end on the real service with scripted simulator models (each its
own SGLang-compatible server process): routing follows the rules exactly, the ledger matches
what the engines counted, lite groups make no call, bad specs are refused with 422."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator import Settings
from orchestrator_sdk import AsyncClient
from tests.evolve.helpers import Q, TRUTH, expected_tiers, sim_metric, sim_model
from tests.servers import running_server

pytestmark = pytest.mark.slow

KEY = "sk-evolve"
H = {"Authorization": f"Bearer {KEY}"}
PRICES = {"strong": (3.0, 15.0), "weak": (0.2, 0.8)}


def _settings(tmp_path: Path, sims: dict[str, Any]) -> Settings:
    return Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/evolve.db", api_keys={KEY: "acme"},
                    log_json=False, worker_poll_seconds=0.05, sandbox_root=str(tmp_path / "sb"),
                    backends=[{"name": n, "kind": "sglang", "url": s.url} for n, s in sims.items()])


def _spec(**over: Any) -> dict[str, Any]:
    spec = {"problems": [{"id": "sheep", "question": Q, "answer": TRUTH}],
            "models": [{"name": "weak", "price_in": PRICES["weak"][0], "price_out": PRICES["weak"][1],
                        "prompt_logprobs": True, "max_tokens": 64},
                       {"name": "strong", "price_in": PRICES["strong"][0], "price_out": PRICES["strong"][1],
                        "max_tokens": 64}],
            "population": 8, "k": 3, "groups": 8, "loops": 3, "percentiles": [25], "lite_fraction": 0.5,
            "seed": 11}
    return spec | over


@pytest.fixture
async def two_models(tmp_path: Path):
    # strong is right 60% of the time alone; weak never is, and copies a group it is shown.
    # weak scores confidence: 3.0 for a candidate stating 17, 1.0 for any other answer.
    sims = {"strong": sim_model(tmp_path, "strong", 0.6, seed=1),
            "weak": sim_model(tmp_path, "weak", 0.0, seed=2, confidence_correct=3.0, confidence_wrong=1.0)}
    try:
        async with running_server(_settings(tmp_path, sims)) as url:
            yield url, sims
    finally:
        for s in sims.values():
            s.kill()


async def test_confidence_routing_lite_and_ledger_follow_the_rules(two_models):
    url, sims = two_models
    async with AsyncClient(base_url=url, api_key=KEY) as client:
        run = await client.runs.create("evolve", input=_spec())
        final = await client.runs.wait(run.id, timeout=60)
        assert final.status == "succeeded", final.error
        out = final.output
        steps = {s.name: s.output for s in await client.runs.steps(run.id)}
        events = (await client.runs.events(run.id, limit=100)).data

    assert list(steps) == ["loop-0", "loop-1", "loop-2", "final"]
    assert out["models"] == ["strong", "weak"]  # most expensive first, whatever the spec's order
    pop0 = steps["loop-0"]["populations"][0]
    assert len(pop0) == 8 and {c["model"] for c in pop0} == {"strong"}
    assert any(c["answer"] == TRUTH for c in pop0) and any(c["answer"] != TRUTH for c in pop0)

    # each candidate is scored once, when written, in the context that wrote it (loop 0: the
    # initial prompt), plus one prefix count per problem and loop; the last loop's are never scored
    assert [c["confidence"] for c in pop0] == pytest.approx([3.0 if c["answer"] == TRUTH else 1.0 for c in pop0])
    strong_calls, weak_calls, lite, scoring = 8, 8 + 1, 0, 8 + 1
    previous = pop0
    for t in (1, 2):
        step = steps[f"loop-{t}"]
        routing = step["routing"][0]
        groups = routing["groups"]
        assert len(groups) == 8 and all(len(set(g)) == 3 for g in groups)
        # fitness = mean scripted confidence of the members, which the weak model derived from their answers
        want = [sum(3.0 if previous[i]["answer"] == TRUTH else 1.0 for i in g) / 3 for g in groups]
        assert routing["fitness"] == pytest.approx(want)
        tiers = expected_tiers(want, [25], 0.5)
        assert ["lite" if t_ == -1 else f"m{t_}" for t_ in routing["tiers"]] == tiers
        new = step["populations"][0]
        for g, tier in enumerate(tiers):
            if tier == "lite":  # no call: the group's majority answer carried forward
                answers = [previous[i]["answer"] for i in groups[g]]
                assert new[g]["model"] == "lite" and new[g]["answer"] == max(answers, key=answers.count)
            else:
                assert new[g]["model"] == {"m0": "strong", "m1": "weak"}[tier]
        assert step["routes"] == {"strong": tiers.count("m0"), "weak": tiers.count("m1"), "lite": tiers.count("lite")}
        strong_calls += tiers.count("m0")
        written = [c for c in new if c["model"] != "lite"]
        if t == 1:  # scored: one pass per candidate a model wrote (a lite one keeps its member's value)
            assert [c["confidence"] for c in new] == pytest.approx(
                [3.0 if c["answer"] == TRUTH else 1.0 for c in new])
            scoring += len(written) + 1
            weak_calls += len(written) + 1
        else:  # the last loop's candidates are never grouped, so never scored
            assert all("confidence" not in c for c in written)
        weak_calls += tiers.count("m1")
        lite += tiers.count("lite")
        previous = new
    assert lite > 0 and strong_calls > 8 and scoring < 2 * 8 + 2

    # the engines saw exactly the calls the routing made (loop 0 and every routed group, no lite)
    assert sim_metric(sims["strong"].url, "num_requests_total") == strong_calls
    assert sim_metric(sims["weak"].url, "num_requests_total") == weak_calls
    total = out["ledger"]["total"]
    for name, sim in sims.items():
        m = total["models"][name]
        assert m["input_tokens"] + m["scoring_tokens"] == sim_metric(sim.url, "prompt_tokens_total")
        assert m["output_tokens"] + m["scoring_output_tokens"] == sim_metric(sim.url, "generation_tokens_total")
        price_in, price_out = PRICES[name]
        cost = ((m["input_tokens"] + m["scoring_tokens"]) * price_in
                + (m["output_tokens"] + m["scoring_output_tokens"]) * price_out) / 1e6
        assert m["cost_usd"] == pytest.approx(cost)
    assert total["models"]["strong"]["scoring_calls"] == 0 and total["models"]["weak"]["scoring_calls"] == scoring
    assert total["cost_usd"] == pytest.approx(sum(m["cost_usd"] for m in total["models"].values()))
    loop_costs = [x["cost_usd"] for x in out["ledger"]["loops"]]
    assert total["cost_usd"] == pytest.approx(sum(loop_costs) + out["ledger"]["final"]["cost_usd"])
    assert total["tier_calls"] == {"strong": strong_calls, "weak": weak_calls - scoring, "lite": lite}
    assert total["lite"] == lite

    answer = out["answers"][0]
    votes = {}
    for c in answer["population"]:
        votes[c["answer"]] = votes.get(c["answer"], 0) + 1
    assert answer["answer"] == out["answer"] == max(votes, key=votes.get) and answer["votes"] == votes
    assert out["accuracy"] == (1.0 if answer["answer"] == TRUTH else 0.0)
    assert 0 <= out["timing"]["overhead_ratio"] < 1 and out["timing"]["model_busy_s"] > 0
    timing = out["timing"]
    assert 0 < timing["scoring_busy_s"] <= timing["model_busy_s"] and 0 < timing["scoring_ratio"] < 1
    assert timing["scoring_busy_s"] == pytest.approx(sum(x["scoring_busy_s"] for x in out["loops"]))
    assert out["loops"][2]["scoring_busy_s"] == 0  # the last loop scores nothing

    loops = [e.data for e in events if e.type == "evolve.loop"]
    assert [e["loop"] for e in loops] == [0, 1, 2]
    assert [e["routes"] for e in loops[1:]] == [steps["loop-1"]["routes"], steps["loop-2"]["routes"]]
    assert loops[-1]["tokens_so_far"]["scoring"] == total["tokens"]["scoring"]
    assert loops[1]["fitness"]["max"] <= 3.0 and loops[1]["fitness"]["min"] >= 1.0
    assert [e.type for e in events if e.type.startswith("evolve.")] == [
        "evolve.started", "evolve.loop", "evolve.loop", "evolve.loop", "evolve.finished"]
    done = next(e.data for e in events if e.type == "evolve.finished")
    assert done["lite"] == lite and done["cost_usd"] == pytest.approx(total["cost_usd"])

    async with httpx.AsyncClient(base_url=url, headers=H) as http:
        metrics = (await http.get("/metrics")).text
        programs = (await http.get("/v1/programs")).json()["data"]
    assert f'orchestrator_evolve_routed_total{{tier="lite"}} {float(lite)}' in metrics
    assert f'orchestrator_evolve_calls_total{{kind="score",model="weak"}} {float(scoring)}' in metrics
    assert f'orchestrator_evolve_calls_total{{kind="generate",model="strong"}} {float(strong_calls)}' in metrics
    assert "orchestrator_evolve_loops_total 3.0" in metrics
    assert 'orchestrator_evolve_cost_dollars_total{model="strong"}' in metrics
    assert programs == []  # every (problem, model) program was released


async def test_diversity_single_model_and_synthesized_final(two_models):
    url, sims = two_models
    async with AsyncClient(base_url=url, api_key=KEY) as client:
        # percentile 10: most groups here share the median's count of answers, and a group tied with
        # the threshold goes to the expensive model; at 10 the weak model still gets the clearer ones
        dspec = _spec(fitness="diversity", lite_fraction=0.0, loops=2, percentiles=[10])
        dspec["models"][0]["endpoint"] = "completions"  # weak gets the ChatML-rendered prompt on /generate
        div = await client.runs.create("evolve", input=dspec)
        single = await client.runs.create("evolve", input=_spec(
            models=[{"name": "strong", "max_tokens": 64}], loops=2, final="synthesize", lite_fraction=0.0,
            percentiles=None, update="accumulate"))
        d = await client.runs.wait(div.id, timeout=60)
        s = await client.runs.wait(single.id, timeout=60)
        assert d.status == "succeeded" and s.status == "succeeded", (d.error, s.error)
        dsteps = {x.name: x.output for x in await client.runs.steps(div.id)}

    # diversity: no scoring pass at all; fitness is minus the distinct answers of each group
    assert d.output["ledger"]["total"]["tokens"]["scoring"] == 0
    prev = dsteps["loop-0"]["populations"][0]
    routing = dsteps["loop-1"]["routing"][0]
    assert routing["fitness"] == [-float(len({prev[i]["answer"] for i in g})) for g in routing["groups"]]
    assert ["lite" if t == -1 else f"m{t}" for t in routing["tiers"]] == expected_tiers(routing["fitness"], [10], 0)
    weak_made = [c for c in dsteps["loop-1"]["populations"][0] if c["model"] == "weak"]
    assert weak_made and all(c["answer"] is not None for c in weak_made)  # it found the question in the prompt
    # one model: no fitness, no routing; accumulate keeps loop 0's candidates; the final answer is synthesized
    out = s.output
    assert out["ledger"]["total"]["models"].keys() == {"strong"}
    assert out["ledger"]["total"]["tier_calls"] == {"strong": 8 + 8 + 1}
    assert len(out["answers"][0]["population"]) == 16
    assert out["answers"][0]["method"] == "synthesize" and out["ledger"]["final"]["models"]["strong"]["calls"] == 1


async def test_bad_specs_are_refused_and_unknown_backends_fail_the_run(two_models):
    url, _ = two_models
    async with httpx.AsyncClient(base_url=url, headers=H) as http:
        for patch, param in [({"fitness": "vibes"}, "fitness"), ({"percentiles": [10, 20]}, None),
                             ({"k": 30}, None), ({"models": [{"name": "a"}, {"name": "b"}]}, None),
                             ({"selection": "roulette"}, "selection")]:
            r = await http.post("/v1/runs", json={"workflow": "evolve", "input": _spec(**patch)})
            assert r.status_code == 422, r.text
            err = r.json()["error"]
            assert err["code"] == "invalid_input", err
            if param:
                assert param in err["message"]
        assert (await http.get("/v1/runs")).json()["data"] == []  # nothing was written
        r = await http.post("/v1/runs", json={"workflow": "evolve", "input": _spec(
            models=[{"name": "nowhere", "max_tokens": 8}], lite_fraction=0.0, percentiles=None)})
        run_id = r.json()["id"]
        final = (await http.get(f"/v1/runs/{run_id}", params={"wait": 20})).json()
        assert final["status"] == "failed" and final["error"]["code"] == "unknown_backend"
        assert "nowhere" in final["error"]["message"]
        schema = {w["name"]: w for w in (await http.get("/v1/workflows")).json()["data"]}["evolve"]["input_schema"]
        assert {"problems", "models", "percentiles", "lite_fraction"} <= set(schema["properties"])


async def test_the_evolve_spec_is_in_the_openapi_schema(tmp_path: Path):
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/o.db", api_keys={KEY: "acme"}, log_json=False)
    async with running_server(settings) as url, httpx.AsyncClient(base_url=url) as http:
        spec = (await http.get("/openapi.json")).json()
    assert spec["x-workflow-inputs"]["evolve"] == "EvolveInput"
    evolve = spec["components"]["schemas"]["EvolveInput"]
    assert {"problems", "models", "population", "k", "loops", "percentiles", "fitness", "lite_fraction",
            "lite_method", "selection", "update", "recombination", "final", "answer_format"} <= set(evolve["properties"])
    model = spec["components"]["schemas"]["ModelSpec"]
    assert {"price_in", "price_out", "temperature", "top_p", "max_tokens", "endpoint", "prompt_logprobs",
            "extra_body"} <= set(model["properties"])
    assert evolve["properties"]["models"]["items"]["$ref"] == "#/components/schemas/ModelSpec"


async def test_mixed_backends_an_openai_compatible_api_and_an_sglang_scorer(tmp_path: Path):
    # the strong model behind an OpenAI-compatible API (chat, no logprobs), the weak one on SGLang
    sims = {"strong": sim_model(tmp_path, "strong", 0.6, seed=1),
            "weak": sim_model(tmp_path, "weak", 0.0, seed=2, confidence_correct=3.0)}
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/m.db", api_keys={KEY: "acme"}, log_json=False,
                        worker_poll_seconds=0.05, sandbox_root=str(tmp_path / "sb"),
                        backends=[{"name": "api", "kind": "openai", "url": sims["strong"].url + "/v1",
                                   "model": "strong"},
                                  {"name": "weak", "kind": "sglang", "url": sims["weak"].url}])
    try:
        async with running_server(settings) as url, AsyncClient(base_url=url, api_key=KEY) as client:
            spec = _spec(loops=2)
            spec["models"][1]["backend"] = "api"
            run = await client.runs.create("evolve", input=spec)
            final = await client.runs.wait(run.id, timeout=60)
            assert final.status == "succeeded", final.error
        total = final.output["ledger"]["total"]
        assert sim_metric(sims["strong"].url, "num_requests_total") == total["models"]["strong"]["calls"] >= 8
        assert total["models"]["strong"]["input_tokens"] == sim_metric(sims["strong"].url, "prompt_tokens_total")
        assert total["models"]["weak"]["scoring_calls"] > 0
    finally:
        for s in sims.values():
            s.kill()

"""Every metric a dashboard or a rule names exists: exported by the service (read from a live
/metrics, with a simulator backend, after a gateway call and a run), a documented SGLang
metric (../shared/sglang-cpu/README.md, measured on SGLang 0.5.23), or a recording rule of
the chart. The expressions are parsed by a real PromQL parser, so each is valid PromQL too."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
import uvicorn
import yaml
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import Settings
from scheduler.sim.cost import preset
from scheduler.sim.engine import EngineConfig
from scheduler.sim.server import create_app as create_sim_app
from tests.deploy.conftest import CHART, ROOT
from tests.servers import free_port, running_server

pytestmark = pytest.mark.slow

SGLANG_README = ROOT.parent / "shared" / "sglang-cpu" / "README.md"
SUFFIXES = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
            "summary": ["_sum", "_count", "_created"], "gauge": [""], "unknown": [""], "info": ["_info"]}


def exported_names(text: str) -> set[str]:
    """Sample names a scrape of this text can give, including those of families with no sample yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(s.name for s in family.samples)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, [""]))
    return names


def documented_sglang_names() -> set[str]:
    """The `sglang:` metrics the measured-SGLang README lists; `*_seconds` ones are histograms."""
    if not SGLANG_README.exists():
        pytest.fail(f"{SGLANG_README} is missing (the SGLang metric names are documented there)")
    [line] = [ln for ln in SGLANG_README.read_text().splitlines() if ln.startswith("| `GET /metrics`")]
    names = set()
    for token in re.findall(r"`([a-z0-9_:]+)`", line.split("Among them:", 1)[1]):
        if token.startswith("_"):
            continue
        base = token if token.startswith("sglang:") else "sglang:" + token
        names.update([base + s for s in ("_bucket", "_sum", "_count")] if base.endswith("_seconds") else [base])
    assert len(names) >= 20, names
    return names


def rule_groups() -> list[dict[str, Any]]:
    return yaml.safe_load((CHART / "rules" / "orchestrator.rules.yaml").read_text())["groups"]


def used_expressions() -> dict[str, str]:
    """Where -> PromQL, with Grafana's variables replaced as Grafana would."""
    exprs: dict[str, str] = {}
    for path in sorted((CHART / "dashboards").glob("*.json")):
        d = json.loads(path.read_text())
        for panel in d["panels"]:
            for t in panel.get("targets", []):
                expr = t["expr"].replace("$__rate_interval", "1m").replace("$namespace", ".*")
                exprs[f"{path.stem} / {panel['title']} / {t['refId']}"] = expr
        for var in d["templating"]["list"]:
            if var["type"] == "query":
                metric = re.fullmatch(r"label_values\((\w+), \w+\)", var["query"]["query"]).group(1)  # type: ignore[union-attr]
                exprs[f"{path.stem} / variable {var['name']}"] = metric
    for group in rule_groups():
        for rule in group["rules"]:
            exprs[f"rule {rule.get('record') or rule.get('alert')}"] = rule["expr"]
    return exprs


@pytest.fixture(scope="module")
def live_metrics(tmp_path_factory: pytest.TempPathFactory) -> str:
    return asyncio.run(scrape(tmp_path_factory.mktemp("metrics")))


async def scrape(d: Path) -> str:
    """The service's /metrics after it served a gateway call through a simulated engine and ran a run."""
    port = free_port()
    sim = uvicorn.Server(uvicorn.Config(create_sim_app(EngineConfig(cost=preset("llama-3.1-8b-h100")), speed=50),
                                        host="127.0.0.1", port=port, log_config=None, access_log=False))
    task = asyncio.create_task(sim.serve())
    while not sim.started:
        await asyncio.sleep(0.02)
    settings = Settings(database_url=f"sqlite+aiosqlite:///{d}/o.db", sandbox_root=str(d / "sb"),
                        backends=[{"name": "sim-0", "kind": "sglang", "url": f"http://127.0.0.1:{port}"}])
    try:
        async with running_server(settings) as url:
            async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer sk-orch-dev"}, timeout=30) as c:
                r = await c.post("/v1/chat/completions", json={"model": "m", "max_tokens": 4, "program_id": "p1",
                                                               "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200, r.text
                run = (await c.post("/v1/runs", json={"workflow": "echo", "input": {"message": "m"}})).json()
                r = await c.get(f"/v1/runs/{run['id']}", params={"wait": 10})
                assert r.json()["status"] == "succeeded"
                assert (await c.get("/readyz")).status_code == 200
                return (await c.get("/metrics")).text
    finally:
        sim.should_exit = True
        await task


@pytest.fixture(scope="module")
def parsed(chartcheck: Callable[[str, Any], Any]) -> dict[str, dict[str, Any]]:
    exprs = used_expressions()
    return dict(zip(exprs, chartcheck("metric-names", list(exprs.values()))))


def test_every_expression_is_valid_promql(parsed: dict[str, dict[str, Any]]) -> None:
    errors = {where: r["error"] for where, r in parsed.items() if "error" in r}
    assert not errors
    assert len(parsed) > 80


def test_every_metric_used_exists(parsed: dict[str, dict[str, Any]], live_metrics: str) -> None:
    service = exported_names(live_metrics)
    assert "orchestrator_scheduler_pauses_total" in service and "orchestrator_db_pool_size" in service
    sglang = documented_sglang_names()
    recorded = {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}
    unknown = {where: sorted(set(r["names"]) - service - sglang - recorded) for where, r in parsed.items()}
    assert not {w: n for w, n in unknown.items() if n}
    used = {n for r in parsed.values() for n in r["names"]}
    # Each family the issue names is on a dashboard or in a rule.
    for needed in ("orchestrator_programs", "orchestrator_scheduler_pinned_tokens", "orchestrator_run_queue_wait_seconds_bucket",
                   "orchestrator_tool_calls_total", "orchestrator_run_recoveries_total", "orchestrator_sse_resumes_total",
                   "sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage", "sglang:cache_hit_rate",
                   "sglang:gen_throughput", "sglang:time_to_first_token_seconds_bucket",
                   "sglang:e2e_request_latency_seconds_bucket", "orchestrator_db_pool_connections"):
        assert needed in used, needed


def test_recording_rules_follow_the_naming_convention() -> None:
    """level:metric:operations, and only recording rules have colons (orchestrator_* otherwise)."""
    for group in rule_groups():
        for rule in group["rules"]:
            if "record" in rule:
                assert re.fullmatch(r"orchestrator:[a-z0-9_]+:[a-z0-9_]+", rule["record"]), rule["record"]


def test_the_check_catches_an_unknown_name(chartcheck: Callable[[str, Any], Any], live_metrics: str) -> None:
    [r] = chartcheck("metric-names", ['sum(rate(orchestrator_runs_sumbitted_total{namespace=~".*"}[1m]))'])
    assert r["names"] == ["orchestrator_runs_sumbitted_total"]
    assert not set(r["names"]) & (exported_names(live_metrics) | documented_sglang_names())

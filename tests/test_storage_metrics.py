"""Metrics of the database pool and the event bus (the chart's "Database and Redis" dashboard),
on SQLite with the in-process bus and on PostgreSQL with Redis."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import running_server


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_pool_and_bus_metrics(make_settings, backend):
    settings = make_settings()
    async with running_server(settings) as url:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer sk-test-a"}, timeout=30) as c:
            before = samples((await c.get("/metrics")).text)
            run = (await c.post("/v1/runs", json={"workflow": "demo", "input": {"steps": 2, "step_seconds": 0}})).json()
            assert (await c.get(f"/v1/runs/{run['id']}", params={"wait": 10})).json()["status"] == "succeeded"
            after = samples((await c.get("/metrics")).text)
    kind = "redis" if backend == "postgres" else "inprocess"
    assert after[("orchestrator_bus_info", (("kind", kind),))] == 1
    delivered = ("orchestrator_bus_messages_delivered_total", ())
    assert after[delivered] > before[delivered]  # the run's events reached this process's subscribers
    assert after[("orchestrator_bus_reconnects_total", ())] == 0
    size = after[("orchestrator_db_pool_size", ())]
    assert size >= 1
    in_use = after[("orchestrator_db_pool_connections", (("state", "checked_out"),))]
    idle = after[("orchestrator_db_pool_connections", (("state", "idle"),))]
    assert 0 <= in_use <= size + after[("orchestrator_db_pool_connections", (("state", "overflow"),))]
    assert idle >= 1  # the connections the run used went back to the pool

"""Quotas (429 + Retry-After), health, readiness, metrics and request ids."""

from __future__ import annotations

import uuid

import httpx

from orchestrator.settings import TenantLimits
from tests.servers import running_server


async def test_request_rate_limit_answers_429_with_retry_after(make_settings):
    tenant = f"rl-{uuid.uuid4().hex[:8]}"  # Redis buckets outlive a test: use a fresh tenant
    settings = make_settings(api_keys={"sk-rl": tenant},
                             tenant_limits={tenant: TenantLimits(requests_per_second=1, burst=3)})
    async with running_server(settings) as url:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer sk-rl"}) as c:
            codes = [(await c.get("/v1/runs")).status_code for _ in range(5)]
            assert codes[:3] == [200, 200, 200] and 429 in codes[3:]
            r = await c.get("/v1/runs")
            assert r.status_code == 429
            assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "rate_limited"
            assert int(r.headers["retry-after"]) >= 1
            metrics = (await c.get("/metrics")).text
            assert 'orchestrator_rate_limited_total{reason="request_rate"}' in metrics


async def test_concurrent_run_limit(make_settings):
    tenant = f"cc-{uuid.uuid4().hex[:8]}"
    settings = make_settings(api_keys={"sk-cc": tenant, "sk-other": "other"},
                             tenant_limits={tenant: TenantLimits(max_concurrent_runs=2)})
    async with running_server(settings) as url:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer sk-cc"}) as c:
            ids = []
            for _ in range(2):
                r = await c.post("/v1/runs", json={"workflow": "sleep", "input": {"seconds": 30}})
                assert r.status_code == 201
                ids.append(r.json()["id"])
            r = await c.post("/v1/runs", json={"workflow": "sleep", "input": {"seconds": 30}})
            assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_concurrent_runs"
            assert "retry-after" in r.headers
            # Another tenant is unaffected; nothing was half-written for the refused run.
            other = await c.post("/v1/runs", json={"workflow": "echo", "input": {"message": 1}},
                                 headers={"Authorization": "Bearer sk-other"})
            assert other.status_code == 201
            assert len((await c.get("/v1/runs")).json()["data"]) == 2
            await c.post(f"/v1/runs/{ids[0]}/cancel")
            await c.get(f"/v1/runs/{ids[0]}", params={"wait": 10})
            r = await c.post("/v1/runs", json={"workflow": "echo", "input": {"message": 1}})
            assert r.status_code == 201
            await c.post(f"/v1/runs/{ids[1]}/cancel")


async def test_health_readiness_metrics_and_request_ids(make_settings):
    async with running_server(make_settings()) as url:
        async with httpx.AsyncClient(base_url=url) as c:
            assert (await c.get("/healthz")).json() == {"status": "ok"}
            ready = await c.get("/readyz")
            assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"
            r = await c.post("/v1/runs", json={"workflow": "demo", "input": {"steps": 2, "step_seconds": 0}},
                             headers={"Authorization": "Bearer sk-test-a", "X-Request-Id": "req-123"})
            assert r.headers["x-request-id"] == "req-123"
            await c.get(f"/v1/runs/{r.json()['id']}", params={"wait": 10},
                        headers={"Authorization": "Bearer sk-test-a"})
            text = (await c.get("/metrics")).text
            for name in ["orchestrator_runs_submitted_total{workflow=\"demo\"} 1.0",
                         "orchestrator_runs_finished_total{status=\"succeeded\",workflow=\"demo\"} 1.0",
                         "orchestrator_steps_total{status=\"completed\"} 2.0",
                         "orchestrator_http_requests_total{method=\"POST\",route=\"/v1/runs\",status=\"201\"} 1.0",
                         "orchestrator_run_queue_wait_seconds_count{workflow=\"demo\"} 1.0"]:
                assert name in text, name
            assert r.json()["id"] not in text  # never a run id as a label


async def test_readyz_fails_when_the_database_is_gone(pg_dsn):
    from orchestrator import Settings
    from tests.services import create_database, drop_database, sqlalchemy_url

    name = await create_database(pg_dsn)
    settings = Settings(database_url=sqlalchemy_url(pg_dsn, name), worker_enabled=False)
    async with running_server(settings) as url:
        async with httpx.AsyncClient(base_url=url) as c:
            assert (await c.get("/readyz")).status_code == 200
            await drop_database(pg_dsn, name)
            r = await c.get("/readyz")
            assert r.status_code == 503
            assert r.json()["status"] == "unavailable" and r.json()["checks"]["database"].startswith("error")
            assert (await c.get("/healthz")).status_code == 200
            text = (await c.get("/metrics")).text
            assert 'orchestrator_readiness_check_failures_total{check="database"} 1.0' in text
            assert 'orchestrator_readiness_check_failures_total{check="bus"}' not in text

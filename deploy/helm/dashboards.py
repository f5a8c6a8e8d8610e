"""Write the chart's Grafana dashboards (deploy/helm/orchestrator/dashboards/*.json).

Why generated: eight dashboards share one layout grid, one ``${datasource}`` and one
``$namespace`` variable, one panel shape; writing them from one table keeps uids stable and
every query in ``$__rate_interval``. The JSON files are committed (the chart ships them as
ConfigMaps); tests/deploy checks that this script reproduces them byte for byte, that every
metric they name exists, and that each is a valid dashboard of the schema version it declares.

    python deploy/helm/dashboards.py          # rewrite the files
    python deploy/helm/dashboards.py --check  # exit 1 if a file differs
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "orchestrator" / "dashboards"
SCHEMA_VERSION = 42  # Grafana 12 / 13 (the default of @grafana/schema 13.2)
DS = {"type": "prometheus", "uid": "${datasource}"}
NS = 'namespace=~"$namespace"'
RI = "$__rate_interval"


@dataclass
class P:
    """One panel: a title, PromQL targets as (expr, legend), a unit, a kind, a width."""

    title: str
    targets: list[tuple[str, str]]
    unit: str = "short"
    kind: str = "timeseries"
    w: int = 12
    h: int = 8
    description: str = ""
    stack: bool = False
    max: float | None = None


@dataclass
class D:
    uid: str
    title: str
    description: str
    rows: list[tuple[str, list[P]]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    ns_metric: str = "orchestrator_runs_executing"


def q(expr: str) -> str:
    """``{NS}`` / ``{NS,...}`` is the namespace selector, ``{RI}`` the rate interval."""
    return expr.replace("{NS}", "{" + NS + "}").replace("{NS,", "{" + NS + ",").replace("{RI}", RI)


def panel(p: P, pid: int, x: int, y: int) -> dict[str, Any]:
    targets = [{"datasource": DS, "expr": q(expr), "legendFormat": legend, "refId": chr(ord("A") + i),
                "range": p.kind == "timeseries", "instant": p.kind != "timeseries"}
               for i, (expr, legend) in enumerate(p.targets)]
    defaults: dict[str, Any] = {"unit": p.unit}
    if p.max is not None:
        defaults["min"], defaults["max"] = 0, p.max
    if p.kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 20 if p.stack else 10,
                              "showPoints": "never", "spanNulls": True,
                              "stacking": {"mode": "normal" if p.stack else "none", "group": "A"}}
        options: dict[str, Any] = {"legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                                              "calcs": ["lastNotNull", "max"]},
                                   "tooltip": {"mode": "multi", "sort": "desc"}}
    else:
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                   "colorMode": "value", "graphMode": "area", "justifyMode": "auto", "textMode": "auto",
                   "orientation": "auto", "wideLayout": True, "showPercentChange": False}
    out: dict[str, Any] = {"id": pid, "type": p.kind, "title": p.title, "datasource": DS,
                           "gridPos": {"x": x, "y": y, "w": p.w, "h": p.h},
                           "fieldConfig": {"defaults": defaults, "overrides": []},
                           "options": options, "targets": targets}
    if p.description:
        out["description"] = p.description
    return out


def dashboard(d: D) -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for row_title, row_panels in d.rows:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})
        pid, y, x, row_h = pid + 1, y + 1, 0, 0
        for p in row_panels:
            if x + p.w > 24:
                x, y, row_h = 0, y + row_h, 0
            panels.append(panel(p, pid, x, y))
            pid, x, row_h = pid + 1, x + p.w, max(row_h, p.h)
        y += row_h
    return {
        "uid": d.uid, "title": d.title, "description": d.description,
        "tags": ["orchestrator", *d.tags], "editable": True, "graphTooltip": 1, "timezone": "browser",
        "schemaVersion": SCHEMA_VERSION, "version": 1, "refresh": "30s", "liveNow": False,
        "fiscalYearStartMonth": 0, "weekStart": "",
        "time": {"from": "now-1h", "to": "now"}, "timepicker": {},
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "links": [{"title": "Orchestrator", "type": "dashboards", "tags": ["orchestrator"], "asDropdown": True,
                   "includeVars": True, "keepTime": True, "icon": "external link", "tooltip": "",
                   "url": "", "targetBlank": False}],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "hide": 0, "refresh": 1, "regex": "", "skipUrlSync": False, "options": []},
            {"name": "namespace", "label": "Namespace", "type": "query", "datasource": DS,
             "query": {"query": f"label_values({d.ns_metric}, namespace)", "refId": "namespace"},
             "includeAll": True, "allValue": ".*", "multi": True, "hide": 0,
             "refresh": 2, "regex": "", "sort": 1, "skipUrlSync": False, "options": []},
        ]},
        "panels": panels,
    }


def hq(quantile: float, metric: str, by: str = "") -> str:
    """A quantile from a histogram's buckets, over the rate interval."""
    group = f"le, {by}" if by else "le"
    return f"histogram_quantile({quantile}, sum by ({group}) (rate({metric}_bucket{{NS}}[{{RI}}])))"


DASHBOARDS = [
    D("orch-health", "Orchestrator / Service health",
      "Requests, errors and latency of the control plane's API; what is executing and streaming.",
      tags=["health"], rows=[
          ("Traffic", [
              P("Requests by status", [("sum by (status) (rate(orchestrator_http_requests_total{NS}[{RI}]))", "{{status}}")],
                "reqps", stack=True),
              P("5xx ratio", [("sum(rate(orchestrator_http_requests_total{NS,status=~\"5..\"}[{RI}]))"
                               " / clamp_min(sum(rate(orchestrator_http_requests_total{NS}[{RI}])), 1e-9)", "5xx")],
                "percentunit", max=1),
              P("Latency by route (p95)", [(hq(0.95, "orchestrator_http_request_duration_seconds", "route"),
                                            "{{route}}")], "s"),
              P("Latency (p50 / p99)", [(hq(0.5, "orchestrator_http_request_duration_seconds"), "p50"),
                                        (hq(0.99, "orchestrator_http_request_duration_seconds"), "p99")], "s"),
          ]),
          ("Load", [
              P("Runs executing", [("sum(orchestrator_runs_executing{NS})", "executing")], kind="stat", w=6),
              P("Event streams open", [("sum(orchestrator_sse_streams_active{NS})", "streams")], kind="stat", w=6),
              P("Refused by quota", [("sum by (reason) (rate(orchestrator_rate_limited_total{NS}[{RI}]))", "{{reason}}")],
                "reqps", w=12),
              P("Readiness check failures", [("sum by (check) (increase(orchestrator_readiness_check_failures_total{NS}[{RI}]))",
                                              "{{check}}")], w=24,
                description="Failed /readyz checks: the database or the bus did not answer a probe."),
          ]),
      ]),
    D("orch-runs", "Orchestrator / Runs",
      "Durable runs: submissions, outcomes, durations and the wait in the queue.", tags=["runs"], rows=[
          ("Flow", [
              P("Submitted by workflow", [("sum by (workflow) (rate(orchestrator_runs_submitted_total{NS}[{RI}]))",
                                           "{{workflow}}")], "ops", stack=True),
              P("Finished by status", [("sum by (status) (rate(orchestrator_runs_finished_total{NS}[{RI}]))", "{{status}}")],
                "ops", stack=True),
              P("Success ratio", [("sum(rate(orchestrator_runs_finished_total{NS,status=\"succeeded\"}[{RI}]))"
                                   " / clamp_min(sum(rate(orchestrator_runs_finished_total{NS}[{RI}])), 1e-9)", "succeeded")],
                "percentunit", max=1),
              P("Steps by outcome", [("sum by (status) (rate(orchestrator_steps_total{NS}[{RI}]))", "{{status}}")], "ops",
                description="replayed = served from a checkpoint after a recovery"),
          ]),
          ("Time", [
              P("Duration by workflow (p50)", [(hq(0.5, "orchestrator_run_duration_seconds", "workflow"), "{{workflow}}")], "s"),
              P("Duration by workflow (p95)", [(hq(0.95, "orchestrator_run_duration_seconds", "workflow"), "{{workflow}}")], "s"),
              P("Queue wait (p50 / p95)", [(hq(0.5, "orchestrator_run_queue_wait_seconds"), "p50"),
                                           (hq(0.95, "orchestrator_run_queue_wait_seconds"), "p95")], "s"),
              P("Runs executing", [("sum(orchestrator_runs_executing{NS})", "executing")]),
          ]),
      ]),
    D("orch-scheduling", "Orchestrator / Programs and scheduling",
      "The program-aware scheduler: programs by phase and status, pauses and resumes, pinned KV, "
      "cache hits, decision time and how evenly calls wait.", tags=["scheduler"],
      ns_metric="orchestrator_scheduler_dispatches_total", rows=[
          ("Programs", [
              P("Programs by phase and status", [("sum by (phase, status) (orchestrator_programs{NS})", "{{phase}} / {{status}}")],
                stack=True),
              P("Pauses, resumes, releases", [
                  ("sum(rate(orchestrator_scheduler_pauses_total{NS}[{RI}]))", "pauses"),
                  ("sum(rate(orchestrator_scheduler_resumes_total{NS}[{RI}]))", "resumes"),
                  ("sum(rate(orchestrator_scheduler_programs_released_total{NS}[{RI}]))", "released"),
                  ("sum(rate(orchestrator_scheduler_programs_idle_released_total{NS}[{RI}]))", "released idle")], "ops",
                description="Released idle: gateway programs with nothing in flight for "
                            "config.programIdleReleaseS, whose agent never released them."),
              P("Dispatches and Retains", [
                  ("sum(rate(orchestrator_scheduler_dispatches_total{NS}[{RI}]))", "calls"),
                  ("sum(rate(orchestrator_scheduler_retains_total{NS}[{RI}]))", "retains")], "ops",
                description="Retains: one-token calls that rank a kept program's KV ahead of released KV "
                            "(backends with --radix-eviction-policy priority)."),
              P("Pinned KV tokens", [("sum(orchestrator_scheduler_pinned_tokens{NS})", "pinned")]),
          ]),
          ("Cache and decisions", [
              P("KV hit ratio", [("orchestrator:kv_hit:ratio_rate5m{NS}", "last 5m {{namespace}}"),
                                 ("orchestrator_scheduler_kv_hit_ratio{NS}", "since start {{instance}}")],
                "percentunit", max=1, description="Cached over prompt tokens of finished calls."),
              P("Decision time (p50 / p99)", [
                  ("max(orchestrator_scheduler_decision_seconds{NS,quantile=\"0.5\"})", "p50"),
                  ("max(orchestrator_scheduler_decision_seconds{NS,quantile=\"0.99\"})", "p99")], "s"),
              P("Dispatch wait (p50 / p99)", [
                  ("max(orchestrator_scheduler_hold_seconds{NS,quantile=\"0.5\"})", "p50"),
                  ("max(orchestrator_scheduler_hold_seconds{NS,quantile=\"0.99\"})", "p99")], "s",
                description="How long calls were held before dispatch (recent window)."),
              P("Fairness: p99 / p50 dispatch wait", [
                  ("max(orchestrator_scheduler_hold_seconds{NS,quantile=\"0.99\"})"
                   " / clamp_min(max(orchestrator_scheduler_hold_seconds{NS,quantile=\"0.5\"}), 1e-3)", "spread")],
                description="1 = every call waits alike; a large spread means some programs wait far longer "
                            "than the typical one."),
          ]),
      ]),
    D("orch-backends", "Orchestrator / Backends",
      "The engines as the control plane sees them, and SGLang's own metrics (sglang:*) from the PodMonitor.",
      tags=["backends", "sglang"], ns_metric="orchestrator_backend_healthy", rows=[
          ("Control plane's view", [
              P("Healthy", [("min by (backend) (orchestrator_backend_healthy{NS})", "{{backend}}")], max=1, w=8),
              P("KV used / capacity", [("orchestrator:backend_kv_used:ratio{NS}", "{{backend}}")], "percentunit", max=1, w=8),
              P("KV capacity (tokens)", [("max by (backend) (orchestrator_backend_kv_capacity_tokens{NS})", "{{backend}}")], w=8),
          ]),
          ("SGLang engines", [
              P("Running requests", [("sum by (pod) (sglang:num_running_reqs{NS})", "{{pod}}")], w=8),
              P("Queued requests", [("sum by (pod) (sglang:num_queue_reqs{NS})", "{{pod}}")], w=8),
              P("Token usage (KV pool)", [("max by (pod) (sglang:token_usage{NS})", "{{pod}}")], "percentunit", max=1, w=8),
              P("Cache hit rate", [("max by (pod) (sglang:cache_hit_rate{NS})", "{{pod}}")], "percentunit", max=1, w=8),
              P("Generation throughput", [("sum by (pod) (sglang:gen_throughput{NS})", "{{pod}}")], "short", w=8,
                description="tokens/s as SGLang reports it"),
              P("Tokens per second", [
                  ("sum(rate(sglang:prompt_tokens_total{NS}[{RI}]))", "prompt"),
                  ("sum(rate(sglang:cached_tokens_total{NS}[{RI}]))", "prompt, cached"),
                  ("sum(rate(sglang:generation_tokens_total{NS}[{RI}]))", "generated")], "short", w=8),
              P("Time to first token", [(hq(0.5, "sglang:time_to_first_token_seconds"), "p50"),
                                        (hq(0.95, "sglang:time_to_first_token_seconds"), "p95"),
                                        (hq(0.99, "sglang:time_to_first_token_seconds"), "p99")], "s"),
              P("End-to-end latency", [(hq(0.5, "sglang:e2e_request_latency_seconds"), "p50"),
                                       (hq(0.95, "sglang:e2e_request_latency_seconds"), "p95"),
                                       (hq(0.99, "sglang:e2e_request_latency_seconds"), "p99")], "s"),
              P("Queue time (p95)", [(hq(0.95, "sglang:queue_time_seconds", "pod"), "{{pod}}")], "s"),
              P("Inter-token latency (p95)", [(hq(0.95, "sglang:inter_token_latency_seconds", "pod"), "{{pod}}")], "s"),
          ]),
      ]),
    D("orch-tools", "Orchestrator / Tools and sandboxes",
      "Agent tool calls and the sandboxes they run in.", tags=["tools"],
      ns_metric="orchestrator_sandbox_disk_bytes", rows=[
          ("Tool calls", [
              P("Calls by tool", [("sum by (tool) (rate(orchestrator_tool_calls_total{NS}[{RI}]))", "{{tool}}")], "ops",
                stack=True),
              P("Errors by kind", [("sum by (outcome) (rate(orchestrator_tool_calls_total{NS,outcome!=\"ok\"}[{RI}]))",
                                    "{{outcome}}")], "ops"),
              P("Duration by tool (p50)", [(hq(0.5, "orchestrator_tool_seconds", "tool"), "{{tool}}")], "s"),
              P("Duration by tool (p95)", [(hq(0.95, "orchestrator_tool_seconds", "tool"), "{{tool}}")], "s"),
          ]),
          ("Sandboxes", [
              P("Sandboxes by state", [("sum by (state) (orchestrator_sandboxes{NS})", "{{state}}")], stack=True),
              P("Workspace disk", [("sum(orchestrator_sandbox_disk_bytes{NS})", "disk")], "bytes"),
          ]),
      ]),
    D("orch-reliability", "Orchestrator / Reliability",
      "Recoveries after a worker died, expired and lost leases, resumed streams, aborted and failed work.",
      tags=["reliability"], rows=[
          ("Durability", [
              P("Recoveries", [("sum(increase(orchestrator_run_recoveries_total{NS}[{RI}]))", "runs taken over")]),
              P("Leases", [("sum(increase(orchestrator_lease_expiries_total{NS}[{RI}]))", "expired"),
                           ("sum(increase(orchestrator_leases_lost_total{NS}[{RI}]))", "lost (not renewed in time, or a newer owner)")]),
              P("Steps replayed from checkpoints", [("sum(rate(orchestrator_steps_total{NS,status=\"replayed\"}[{RI}]))",
                                                     "replayed")], "ops"),
              P("Event streams resumed", [("sum(rate(orchestrator_sse_resumes_total{NS}[{RI}]))", "resumes")], "ops"),
          ]),
          ("Aborts and failures", [
              P("Runs not succeeded", [("sum by (status) (rate(orchestrator_runs_finished_total{NS,status!=\"succeeded\"}[{RI}]))",
                                        "{{status}}")], "ops", stack=True),
              P("Engine aborts", [("sum by (pod) (rate(sglang:num_aborted_requests_total{NS}[{RI}]))", "{{pod}}")], "ops",
                description="Requests aborted on SGLang (cancelled runs, released programs)."),
              P("Bus reconnects", [("sum(increase(orchestrator_bus_reconnects_total{NS}[{RI}]))", "reconnects")]),
              P("Unhealthy backends", [("count(orchestrator_backend_healthy{NS} == 0) or vector(0)", "unhealthy")]),
              P("Backend call failures", [("sum by (backend) (increase(orchestrator_backend_call_failures_total{NS}[{RI}]))",
                                           "{{backend}}")],
                description="Calls a backend failed; it is marked down until it answers an observation."),
              P("Calls placed again", [("sum(rate(orchestrator_scheduler_calls_placed_again_total{NS}[{RI}]))",
                                        "failed over")], "ops",
                description="Calls that failed before any output and were answered by another backend."),
          ]),
      ]),
    D("orch-evolve", "Orchestrator / Evolve",
      "Squeeze-Evolve runs: spend and tokens per model, calls per tier (lite makes none), loops.",
      tags=["evolve"], ns_metric="orchestrator_evolve_loops_total", rows=[
          ("Cost", [
              P("Spend per model", [("sum by (model) (increase(orchestrator_evolve_cost_dollars_total{NS}[{RI}]))",
                                     "{{model}}")], "currencyUSD", stack=True),
              P("Share of spend per model", [("sum by (model) (rate(orchestrator_evolve_cost_dollars_total{NS}[{RI}]))"
                                              " / scalar(sum(rate(orchestrator_evolve_cost_dollars_total{NS}[{RI}])))",
                                              "{{model}}")], "percentunit", max=1,
                description="where the money goes: the strong model should take a minority of the calls"),
          ]),
          ("Tokens and calls", [
              P("Tokens per model and kind", [("sum by (model, kind) (rate(orchestrator_evolve_tokens_total{NS}[{RI}]))",
                                               "{{model}} {{kind}}")], "short", stack=True),
              P("Calls per model and kind", [("sum by (model, kind) (rate(orchestrator_evolve_calls_total{NS}[{RI}]))",
                                              "{{model}} {{kind}}")], "ops", stack=True),
              P("Candidates per tier", [("sum by (tier) (rate(orchestrator_evolve_routed_total{NS}[{RI}]))", "{{tier}}")],
                "ops", stack=True, description="a model's name, or lite (no call: majority vote or a pick)"),
              P("Loops and runs", [("sum(rate(orchestrator_evolve_loops_total{NS}[{RI}]))", "loops"),
                                   ("sum(rate(orchestrator_evolve_runs_total{NS}[{RI}]))", "runs")], "ops"),
          ]),
      ]),
    D("orch-storage", "Orchestrator / Database and Redis",
      "The database connection pool, readiness of the database and the bus, and the bus's traffic.",
      tags=["database", "redis"], ns_metric="orchestrator_db_pool_size", rows=[
          ("Database", [
              P("Pool connections by state", [("sum by (state) (orchestrator_db_pool_connections{NS})", "{{state}}")],
                stack=True),
              P("Pool in use", [("orchestrator:db_pool:utilization{NS}", "{{instance}}")], "percentunit", max=1,
                description="checked-out connections over the pool's size"),
              P("Database readiness failures", [("sum(increase(orchestrator_readiness_check_failures_total{NS,check=\"database\"}[{RI}]))",
                                                 "failures")]),
          ]),
          ("Event bus (Redis)", [
              P("Bus in use", [("count by (kind) (orchestrator_bus_info{NS})", "{{kind}}")], kind="stat", w=6),
              P("Messages delivered", [("sum(rate(orchestrator_bus_messages_delivered_total{NS}[{RI}]))", "messages")],
                "ops", w=9),
              P("Reconnects and readiness failures", [
                  ("sum(increase(orchestrator_bus_reconnects_total{NS}[{RI}]))", "reconnects"),
                  ("sum(increase(orchestrator_readiness_check_failures_total{NS,check=\"bus\"}[{RI}]))", "readiness failures")],
                w=9),
          ]),
      ]),
]


def render_all() -> dict[str, str]:
    return {f"{d.uid}.json": json.dumps(dashboard(d), indent=2) + "\n" for d in DASHBOARDS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args(argv)
    files = render_all()
    if args.check:
        stale = [n for n, text in files.items() if not (OUT / n).exists() or (OUT / n).read_text() != text]
        extra = sorted(p.name for p in OUT.glob("*.json") if p.name not in files)
        for name in stale + extra:
            print(f"out of date: {OUT / name}", file=sys.stderr)
        return 1 if stale or extra else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (OUT / name).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Prometheus metrics of the control plane, one registry per app (no module-level state).

Names follow DESIGN.md: prefix ``orchestrator_``, base units, ``_total`` counters,
bounded labels only (workflow names and statuses, never a run id).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
RUN_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter("orchestrator_http_requests_total", "HTTP requests served.",
                                     ["method", "route", "status"], registry=r)
        self.http_duration = Histogram("orchestrator_http_request_duration_seconds", "HTTP request latency.",
                                       ["method", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.runs_submitted = Counter("orchestrator_runs_submitted_total", "Runs accepted.", ["workflow"], registry=r)
        self.runs_finished = Counter("orchestrator_runs_finished_total", "Runs finished by this process.",
                                     ["workflow", "status"], registry=r)
        self.run_duration = Histogram("orchestrator_run_duration_seconds", "From first start to finish.",
                                      ["workflow"], buckets=RUN_BUCKETS, registry=r)
        self.queue_wait = Histogram("orchestrator_run_queue_wait_seconds", "From submission to first claim.",
                                    ["workflow"], buckets=RUN_BUCKETS, registry=r)
        self.runs_executing = Gauge("orchestrator_runs_executing", "Runs executing in this process.", registry=r)
        self.steps = Counter("orchestrator_steps_total", "Workflow steps by outcome (replayed = served from a checkpoint).",
                             ["status"], registry=r)
        self.recoveries = Counter("orchestrator_run_recoveries_total", "Runs taken over after their lease expired.",
                                  registry=r)
        self.lease_expiries = Counter("orchestrator_lease_expiries_total", "Expired leases found.", registry=r)
        self.leases_lost = Counter("orchestrator_leases_lost_total", "Runs this process lost to a newer owner.",
                                   registry=r)
        self.sse_streams = Gauge("orchestrator_sse_streams_active", "Open event streams.", registry=r)
        self.sse_resumes = Counter("orchestrator_sse_resumes_total", "Event streams resumed from a sequence number.",
                                   registry=r)
        self.rate_limited = Counter("orchestrator_rate_limited_total", "Requests refused by a tenant quota.",
                                    ["reason"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

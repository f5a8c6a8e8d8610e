"""Prometheus metrics of the control plane, one registry per app (no module-level state).

Names follow DESIGN.md: prefix ``orchestrator_``, base units, ``_total`` counters,
bounded labels only (workflow names and statuses, never a run id).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from sqlalchemy.pool import QueuePool

if TYPE_CHECKING:  # types only: the collectors read what the app hands them at scrape time
    from sqlalchemy.ext.asyncio import AsyncEngine

    from orchestrator.events.bus import EventBus
    from scheduler.runtime import ProgramRuntime
    from tools.sandbox.pool import SandboxPool

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
        self.steps = Counter("orchestrator_steps_total",
                             "Workflow steps by outcome (replayed = served from a checkpoint).", ["status"], registry=r)
        self.recoveries = Counter("orchestrator_run_recoveries_total", "Runs taken over after their lease expired.",
                                  registry=r)
        self.lease_expiries = Counter("orchestrator_lease_expiries_total", "Expired leases found.", registry=r)
        self.leases_lost = Counter("orchestrator_leases_lost_total",
                                   "Runs this process stopped: lost to a newer owner, or not renewed in time.",
                                   registry=r)
        self.sse_streams = Gauge("orchestrator_sse_streams_active", "Open event streams.", registry=r)
        self.sse_resumes = Counter("orchestrator_sse_resumes_total", "Event streams resumed from a sequence number.",
                                   registry=r)
        self.rate_limited = Counter("orchestrator_rate_limited_total", "Requests refused by a tenant quota.",
                                    ["reason"], registry=r)
        self.readiness_failures = Counter("orchestrator_readiness_check_failures_total",
                                          "Failed /readyz checks (the kubelet probes every few seconds).",
                                          ["check"], registry=r)
        self.tool_calls = Counter("orchestrator_tool_calls_total", "Agent tool calls by tool and outcome "
                                  "(ok, or the error kind).", ["tool", "outcome"], registry=r)
        self.tool_seconds = Histogram("orchestrator_tool_seconds", "Duration of agent tool calls.", ["tool"],
                                      buckets=LATENCY_BUCKETS + (30, 60, 300), registry=r)
        self.evolve_tokens = Counter("orchestrator_evolve_tokens_total", "Evolve tokens by model and kind "
                                     "(input, output, scoring).", ["model", "kind"], registry=r)
        self.evolve_calls = Counter("orchestrator_evolve_calls_total", "Evolve model calls by model and kind "
                                    "(generate, score).", ["model", "kind"], registry=r)
        self.evolve_routed = Counter("orchestrator_evolve_routed_total", "Evolve candidates produced per tier "
                                     "(a model name, or lite: no call).", ["tier"], registry=r)
        self.evolve_cost = Counter("orchestrator_evolve_cost_dollars_total", "Evolve spend in US dollars by model.",
                                   ["model"], registry=r)
        self.evolve_loops = Counter("orchestrator_evolve_loops_total", "Evolve loops completed.", registry=r)
        self.evolve_runs = Counter("orchestrator_evolve_runs_total", "Evolve runs finished with an answer.",
                                   registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SchedulerCollector:
    """The scheduler's state, read at scrape time (nothing is counted per event).

    Labels stay bounded: phase, status, backend name (from configuration), quantile."""

    def __init__(self, runtime: ProgramRuntime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        rt = self.runtime
        sched = rt.sched
        programs = GaugeMetricFamily("orchestrator_programs", "Live programs by phase and status.",
                                     labels=["phase", "status"])
        counts: dict[tuple[str, str], int] = {}
        pinned = 0
        for p in sched.programs.values():
            key = (p.phase.value, p.status.value)
            counts[key] = counts.get(key, 0) + 1
            pinned += p.tokens if p.pinned else 0
        for (phase, status), n in sorted(counts.items()):
            programs.add_metric([phase, status], n)
        yield programs
        c = sched.counters
        for name, counter, doc in (("pauses", "pauses", "Programs paused."),
                                   ("resumes", "resumes", "Programs resumed."),
                                   ("dispatches", "dispatches", "LLM calls dispatched."),
                                   ("programs_released", "released", "Programs released.")):
            yield CounterMetricFamily(f"orchestrator_scheduler_{name}", doc, value=c[counter])
        stats = rt.stats
        yield CounterMetricFamily("orchestrator_scheduler_retains", "Retain calls sent: a kept program's KV "
                                  "ranked ahead of released KV on the engine.", value=stats.retains_sent)
        yield CounterMetricFamily("orchestrator_scheduler_retains_failed", "Retain calls that failed (the rank "
                                  "is lost, nothing else).", value=stats.retains_failed)
        yield CounterMetricFamily("orchestrator_scheduler_programs_idle_released", "Gateway programs released "
                                  "after ORCH_PROGRAM_IDLE_RELEASE_S with nothing in flight (their agent never "
                                  "released them).", value=stats.idle_released)
        yield GaugeMetricFamily("orchestrator_scheduler_pinned_tokens", "KV tokens of pinned programs.", value=pinned)
        totals = rt.token_totals
        yield CounterMetricFamily("orchestrator_scheduler_prompt_tokens", "Prompt tokens of finished calls.",
                                  value=totals["prompt"])
        yield CounterMetricFamily("orchestrator_scheduler_cached_tokens", "Prompt tokens served from KV cache.",
                                  value=totals["cached"])
        yield GaugeMetricFamily("orchestrator_scheduler_kv_hit_ratio", "Cached over prompt tokens, since start.",
                                value=totals["cached"] / totals["prompt"] if totals["prompt"] else 0.0)
        for name, samples, doc in (
                ("orchestrator_scheduler_decision_seconds", stats.decision_seconds,
                 "Time to handle one event (recent window)."),
                ("orchestrator_scheduler_hold_seconds", stats.held_seconds,
                 "How long calls waited for dispatch (recent window).")):
            g = GaugeMetricFamily(name, doc, labels=["quantile"])
            ordered = sorted(samples)
            for q in (0.5, 0.99):
                g.add_metric([str(q)], ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0)
            yield g
        yield CounterMetricFamily("orchestrator_scheduler_calls_placed_again",
                                  "Calls that failed on a backend before any output and were placed on another.",
                                  value=stats.calls_placed_again)
        failures = CounterMetricFamily("orchestrator_backend_call_failures",
                                       "Calls a backend failed (it is then marked down until it answers).",
                                       labels=["backend"])
        cap = GaugeMetricFamily("orchestrator_backend_kv_capacity_tokens", "KV capacity.", labels=["backend"])
        used = GaugeMetricFamily("orchestrator_backend_kv_used_tokens", "KV tokens in use (observed).",
                                 labels=["backend"])
        healthy = GaugeMetricFamily("orchestrator_backend_healthy", "1 if the last check passed.", labels=["backend"])
        for b in sched.backends.values():
            cap.add_metric([b.name], b.capacity)
            used.add_metric([b.name], b.used)
            healthy.add_metric([b.name], 1 if b.healthy else 0)
            failures.add_metric([b.name], stats.backend_failures.get(b.name, 0))
        yield failures
        yield cap
        yield used
        yield healthy


class SandboxCollector:
    """Sandboxes of the pool by state, and the disk their workspaces hold (last measured)."""

    def __init__(self, pool: SandboxPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        states = GaugeMetricFamily("orchestrator_sandboxes", "Sandboxes by state.", labels=["state"])
        for state, n in sorted(self.pool.state_counts().items()):
            states.add_metric([state], n)
        yield states
        yield GaugeMetricFamily("orchestrator_sandbox_disk_bytes", "Disk held by sandbox workspaces.",
                                value=self.pool.total_disk_bytes)


class StorageCollector:
    """The database connection pool and the event bus, read at scrape time.

    Why: the service's state lives in the database and its fan-out in Redis; a saturated pool
    or a bus that keeps reconnecting shows here before runs slow down."""

    def __init__(self, engine: AsyncEngine, bus: EventBus) -> None:
        self.engine = engine
        self.bus = bus

    def collect(self) -> Iterator[Metric]:
        pool = self.engine.sync_engine.pool
        if isinstance(pool, QueuePool):  # the other pools keep no count
            conns = GaugeMetricFamily("orchestrator_db_pool_connections", "Database connections by state.",
                                      labels=["state"])
            conns.add_metric(["checked_out"], pool.checkedout())
            conns.add_metric(["idle"], pool.checkedin())
            conns.add_metric(["overflow"], max(0, pool.overflow()))
            yield conns
            yield GaugeMetricFamily("orchestrator_db_pool_size", "Connections the pool keeps open.",
                                    value=pool.size())
        bus = self.bus
        info = GaugeMetricFamily("orchestrator_bus_info", "The event bus in use (1).", labels=["kind"])
        info.add_metric([bus.name], 1)
        yield info
        yield CounterMetricFamily("orchestrator_bus_messages_delivered", "Bus messages handed to local subscribers.",
                                  value=bus.delivered)
        yield CounterMetricFamily("orchestrator_bus_reconnects", "Times the bus lost its connection and reconnected.",
                                  value=bus.reconnects)

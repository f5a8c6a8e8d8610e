"""Service settings, read from the environment (``ORCH_*``) or passed in directly.

The defaults are the embedded profile: a SQLite file and an in-process event bus,
so one command starts a working service. Setting ``ORCH_DATABASE_URL`` to
PostgreSQL and ``ORCH_REDIS_URL`` turns on the multi-replica profile.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEV_API_KEY = "sk-orch-dev"


# -- Sandbox ceilings (tools/sandbox containment): the most a tenant's run may ask its tool
# sandbox for; a run asking more is refused at submission (422 sandbox_limit_exceeded).
class SandboxCeilings(BaseModel):
    """The highest sandbox limits a tenant's runs may set (``input.sandbox`` of an ``agent``
    run); one field per limit a run can ask for, same name and unit. ``None``: no ceiling
    beyond the input schema's own maximum."""

    model_config = ConfigDict(extra="forbid")
    wall_s: float | None = Field(default=600.0, gt=0)
    cpu_s: int | None = Field(default=600, ge=1)
    memory_mb: int | None = Field(default=4096, ge=16)
    output_kb: int | None = Field(default=1024, ge=1)
    workspace_mb: int | None = Field(default=4096, ge=1)


class QueueLimits(BaseModel):
    """How many runs of a named queue execute at once, over every replica (``None``: no limit)."""

    model_config = ConfigDict(extra="forbid")
    concurrency: int | None = Field(default=None, ge=1, description="runs of the queue executing at once")
    tenant_concurrency: int | None = Field(default=None, ge=1,
                                           description="runs of one tenant in the queue executing at once")


QUEUE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"


class TenantLimits(BaseModel):
    """Per-tenant quotas. ``None`` means unlimited."""

    max_concurrent_runs: int | None = Field(default=100, ge=1)
    requests_per_second: float | None = Field(default=50.0, gt=0)
    burst: int | None = Field(default=100, ge=1)
    sandbox: SandboxCeilings = Field(default_factory=SandboxCeilings)


class BackendConfig(BaseModel):
    """One LLM backend behind the gateway and the agents."""

    name: str = Field(min_length=1, max_length=100)
    kind: Literal["sglang", "openai", "local"] = "sglang"
    url: str = Field(default="", description="Base URL (not used by kind local: the SmolLM2 engine in process).")
    model: str | None = None
    api_key: str | None = None
    read_timeout_s: float = Field(default=120.0, gt=0)
    capacity_tokens: int = Field(default=1_000_000, gt=0, description=(
        "kind openai: the KV capacity the scheduler assumes (a hosted API reports none)."))

    @model_validator(mode="after")
    def _needs_url(self) -> BackendConfig:
        if self.kind != "local" and not self.url:
            raise ValueError(f"backend {self.name!r} of kind {self.kind} needs a url")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORCH_", extra="ignore")

    database_url: str = "sqlite+aiosqlite:///./var/orchestrator.db"
    redis_url: str | None = None

    host: str = "127.0.0.1"
    port: int = 8080

    # API keys: "key=tenant,key2=tenant2" or a JSON object {"key": "tenant"}.
    api_keys: Annotated[dict[str, str], NoDecode] = Field(default_factory=lambda: {DEV_API_KEY: "default"})
    # Per-tenant overrides as JSON: {"tenant": {"max_concurrent_runs": 5, ...}}.
    tenant_limits: Annotated[dict[str, TenantLimits], NoDecode] = Field(default_factory=dict)
    default_limits: TenantLimits = Field(default_factory=TenantLimits)
    # Named queues a run may ask for (``queue`` on submit), as JSON:
    # {"rollouts": {"concurrency": 64, "tenant_concurrency": 8}}. ``default`` always exists.
    queues: Annotated[dict[str, QueueLimits], NoDecode] = Field(default_factory=dict)

    max_body_bytes: int = 1_048_576
    # -- Batches (``POST /v1/batches``): at most this many lines (runs) a batch, each line at most
    # this many bytes. The whole body is still bounded by ``max_body_bytes`` and the tenant's
    # ``max_concurrent_runs`` counts every run of a batch at submission.
    max_batch_requests: int = Field(default=10_000, ge=1)
    max_batch_line_bytes: int = Field(default=65_536, ge=1)
    # -- Bad input (issue 16). uvicorn bounds neither how long a request body may take nor the
    # tokens a gateway call may ask for: a body shorter than its Content-Length held a connection
    # for good (now 408 after this many seconds), and a max_tokens of 2**31 took a backend down
    # (now 422 above this ceiling, or above the context length the backends report).
    body_read_timeout_s: float = Field(default=30.0, gt=0)
    max_tokens_ceiling: int = Field(default=32_768, ge=1)

    # Worker / durability.
    worker_enabled: bool = True
    worker_concurrency: int = Field(default=16, ge=1)
    # PostgreSQL connections kept open: the worker writes at most one checkpoint per executing
    # run at a time, plus its claim and heartbeat, and the API a burst of requests beside them.
    db_pool_size: int = Field(default=32, ge=1, le=500)
    worker_poll_seconds: float = Field(default=1.0, gt=0)
    lease_seconds: float = Field(default=15.0, gt=0)
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)

    # Streaming.
    sse_keepalive_seconds: float = Field(default=15.0, gt=0)
    max_wait_seconds: float = Field(default=60.0, gt=0)

    # Extra workflow modules to load: each exposes ``register(registry)``.
    workflow_modules: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # LLM backends as JSON: [{"name": "gpu-0", "kind": "sglang", "url": "http://10.0.0.5:30000"}].
    backends: Annotated[list[BackendConfig], NoDecode] = Field(default_factory=list)
    scheduler_policy: str = "program"
    # The policy's options as JSON, e.g. {"aging_s": 600} for ``program``'s tail setting
    # (docs/scheduler.md); checked at start: an option the policy lacks is a configuration error.
    scheduler_policy_options: Annotated[dict[str, Any], NoDecode] = Field(default_factory=dict)
    # A gateway program with nothing in flight (no call, no tool hint) for this long is released,
    # as if its agent had called release: agents that never do would otherwise keep a place in
    # the program table and a sandbox for good. 0 turns it off.
    program_idle_release_s: float = Field(default=1800.0, ge=0)

    # Tool sandboxes (agents): one per program, under this directory.
    sandbox_root: str = "./var/sandboxes"
    sandbox_max: int = Field(default=64, ge=1)
    sandbox_exec_concurrency: int = Field(default=8, ge=1)
    # "kubernetes": one pod per program (tools.sandbox.kubernetes); its options as JSON, e.g.
    # {"namespace": "agents", "image": "ghcr.io/...", "runtime_class_name": "gvisor"}.
    sandbox_kind: Literal["subprocess", "kubernetes"] = "subprocess"
    sandbox_kubernetes: Annotated[dict[str, Any], NoDecode] = Field(default_factory=dict)

    log_level: str = "INFO"
    log_json: bool = True

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("{"):
                return json.loads(value)
            pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
            if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
                raise ValueError("ORCH_API_KEYS must look like 'key=tenant,key2=tenant2'")
            return {k.strip(): t.strip() for k, t in pairs}
        return value

    @field_validator("queues", mode="before")
    @classmethod
    def _parse_queues(cls, value: Any) -> Any:
        value = json.loads(value) if isinstance(value, str) else value
        bad = [name for name in value or {} if not re.match(QUEUE_NAME_PATTERN, name)]
        if bad:
            raise ValueError(f"queue names must match {QUEUE_NAME_PATTERN}: {bad}")
        return value

    @model_validator(mode="after")
    def _policy_exists(self) -> Settings:
        """Build the policy once, so a misspelt name or option fails at start, not at the first call."""
        from scheduler.core import make_policy  # the scheduler core is pure: no I/O at import

        try:
            make_policy(self.scheduler_policy, **self.scheduler_policy_options)
        except (TypeError, ValueError) as e:  # unknown name or option, or a value of the wrong type
            raise ValueError(f"ORCH_SCHEDULER_POLICY / ORCH_SCHEDULER_POLICY_OPTIONS: {e}") from None
        return self

    @field_validator("sandbox_kubernetes", "tenant_limits", "scheduler_policy_options", "backends", mode="before")
    @classmethod
    def _parse_json(cls, value: Any) -> Any:
        """The settings given as JSON in the environment (``NoDecode``: parsed here, not by pydantic-settings)."""
        return json.loads(value) if isinstance(value, str) else value

    @field_validator("workflow_modules", mode="before")
    @classmethod
    def _parse_modules(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [m.strip() for m in value.split(",") if m.strip()]
        return value

    def limits_for(self, tenant: str) -> TenantLimits:
        return self.tenant_limits.get(tenant, self.default_limits)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

"""The ``agent`` workflow: one agent run is one scheduler program with one sandbox.

Its LLM calls go through the scheduler runtime with the run id as the program id (so the
scheduler can hold, pause and resume it like any gateway program), all through one
``ProgramSession`` that declares the program's sandbox; its tool calls run in that sandbox and
are reported to the scheduler as the acting phase. Whatever way the run ends (answer, budget,
failure, cancel) the session releases the program and the sandbox is collected.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import TYPE_CHECKING, Any, cast

from agents.loop import AgentLoop, PromptEncoder, ToolHooks
from agents.spec import AgentInput, SandboxSpec
from orchestrator.errors import ValidationFailed
from orchestrator.runs.batches import return_tokens_asked
from orchestrator.runs.context import RunContext, RunFailed
from orchestrator.settings import TenantLimits
from scheduler.backends.base import GenerateRequest
from scheduler.runtime import estimate_tokens
from scheduler.session import ProgramSession
from tools.builtins import BUILTIN_NAMES
from tools.registry import ToolContext, ToolRegistry, ToolResult
from tools.sandbox.base import Limits

if TYPE_CHECKING:
    from orchestrator.metrics import Metrics
    from orchestrator.workflows.registry import WorkflowRegistry
    from tools.sandbox import SandboxPool


def check_sandbox_ceilings(inp: AgentInput, limits: TenantLimits) -> None:
    """Refuse at submission a run whose sandbox asks for more than its tenant's ceilings: the
    input schema's maxima are the service's, the operator sets each tenant's (``sandbox`` in
    ``ORCH_TENANT_LIMITS`` / ``ORCH_DEFAULT_LIMITS``)."""
    for name in SandboxSpec.model_fields:
        asked, ceiling = getattr(inp.sandbox, name), getattr(limits.sandbox, name)
        if ceiling is not None and asked > ceiling:
            raise ValidationFailed(f"input.sandbox.{name} is {asked}; this tenant's runs may ask for at most "
                                   f"{ceiling}.", code="sandbox_limit_exceeded", param=f"input.sandbox.{name}")


def sandbox_limits(inp: AgentInput) -> Limits:
    s = inp.sandbox
    return Limits(wall_s=s.wall_s, cpu_s=s.cpu_s, memory_bytes=s.memory_mb << 20, output_bytes=s.output_kb << 10,
                  workspace_bytes=s.workspace_mb << 20)


class _MeteredTools(ToolRegistry):
    """The run's tools, run within the pool's concurrency bound and counted in the metrics."""

    def __init__(self, inner: ToolRegistry, metrics: Metrics | None, pool: SandboxPool) -> None:
        super().__init__(inner.get(n) for n in inner.names())  # type: ignore[misc]
        self.metrics = metrics
        self.pool = pool

    async def call(self, name: str, arguments: Any, ctx: ToolContext) -> ToolResult:
        async with self.pool.exec_slot():  # tool concurrency across all programs is bounded
            result = await super().call(name, arguments, ctx)
        if self.metrics is not None:
            label = name if name in self else "unknown"
            self.metrics.tool_calls.labels(label, "ok" if result.ok else (result.error or "error")).inc()
            self.metrics.tool_seconds.labels(label).observe(result.duration_s)
        return result


async def agent(ctx: RunContext, inp: AgentInput) -> dict[str, Any]:
    """Run a tool-calling agent to an answer or a budget; every turn and tool call is a step."""
    services = ctx.services
    runtime = ctx.runtime([inp.backend] if inp.backend else [])
    pool = services.sandboxes
    if pool is None:
        raise RunFailed("no_sandboxes", "The agent workflow needs the sandbox pool, which is not running here.")
    program, tenant = ctx.run_id, ctx.tenant
    # runs with the same system prompt and tools share that prefix's KV: the scheduler counts it once
    head = json.dumps([inp.system_prompt, inp.tool_mode, sorted(inp.tools or BUILTIN_NAMES)])
    prefix_key = "agent:" + hashlib.sha256(head.encode()).hexdigest()[:16]
    prefix_tokens = estimate_tokens(GenerateRequest(prompt=head)) + 60 * len(inp.tools or BUILTIN_NAMES)
    tools = _MeteredTools(services.tools.subset(inp.tools if inp.tools is not None else BUILTIN_NAMES),
                          services.metrics, pool)
    session = ProgramSession(runtime, program, tenant, sandbox=True, prefix_key=prefix_key,
                             prefix_tokens=prefix_tokens, backends=(inp.backend,) if inp.backend else None)

    t0 = time.monotonic()
    async with session:
        sandbox = await pool.acquire(program)
        sandbox.limits = sandbox_limits(inp)
        try:
            await ctx.emit("agent.started", {"program_id": program, "tools": tools.names(), "model": inp.model,
                                             "tool_mode": inp.tool_mode, "sandbox": sandbox.info().kind,
                                             "sandbox_ready_s": round(time.monotonic() - t0, 3)})
            if inp.files:
                await ctx.step("workspace", _seed, sandbox, inp.files)
            record = return_tokens_asked(ctx.metadata)
            loop = AgentLoop(inp, ctx, session.generate, tools, ToolContext(sandbox, program, tenant),
                             ToolHooks(session.tool_started, session.tool_ended), record_tokens=record,
                             encode=prompt_encoder(runtime, inp.backend) if record else None)
            result = await loop.run()
            result["workspace"] = await ctx.step("workspace-listing", _listing, sandbox)
            return result
        finally:
            await pool.release(program)


def prompt_encoder(runtime: Any, backend: str | None) -> PromptEncoder | None:
    """What gives a turn's prompt token ids when a run records its tokens: the backends' own
    tokenizer where it runs in this process (the local engine's ``encode``: the ids it feeds
    its model) and every backend the run may use has it. SGLang's and OpenAI-compatible chat
    APIs return no prompt token ids (``None``: the run's trajectory then has no tokens)."""
    backends = getattr(runtime, "backends", {})
    names = [backend] if backend else list(backends)
    encoders = [getattr(backends.get(name), "encode", None) for name in names]
    if not encoders or not all(callable(e) for e in encoders):
        return None
    return cast(PromptEncoder, encoders[0])


async def _seed(sandbox: Any, files: dict[str, str]) -> list[str]:
    for path, text in files.items():
        await sandbox.write_file(path, text.encode())
    return sorted(files)


async def _listing(sandbox: Any) -> list[dict[str, Any]]:
    entries = await sandbox.list_files(".", recursive=True, limit=200)
    return [{"path": e.path, "size": e.size} for e in entries if not e.is_dir]


def register(registry: WorkflowRegistry) -> None:
    """The ``orchestrator.workflows`` entry point (see pyproject.toml)."""
    registry.workflow("agent", AgentInput, check=check_sandbox_ceilings)(agent)

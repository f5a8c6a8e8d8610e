"""Issue 16, the suite: schemathesis against the live service, every check on, stateful through
the OpenAPI links, on SQLite and on PostgreSQL + Redis: no server error, and no answer (status,
content type, headers, body) that the served OpenAPI document does not describe.

The run is bounded and reproducible: a fixed seed, deterministic generation, a fixed number of
examples per operation and of stateful steps, no shrinking, no deadline (schemathesis turns
Hypothesis's off) and no check on response times.
The service runs in this process with an in-process SGLang simulator as its backend, so the
gateway's routes answer as in production; the worker is off (an API-only replica), so fuzzed
runs stay queued instead of executing arbitrary workflows.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.servers import ROOT, running_server, running_sim

pytestmark = pytest.mark.slow  # schemathesis runs as its own process (its CLI)

KEY = "sk-test-a"
CONFIG = f"""
seed = 16
request-timeout = 20
workers = 1
auth.openapi.BearerAuth.bearer = "{KEY}"
# The API refuses NUL in strings (PostgreSQL text cannot hold it; docs/api.md), which a JSON
# schema cannot say: generating it would call valid what the documentation calls invalid.
generation.allow-x00 = false
# HTTP has recipients ignore header fields they do not know (RFC 9110, section 5.1), and the
# service ignores unknown query parameters too: an extra one is no invalid request.
generation.allow-extra-parameters = false
generation.deterministic = true
generation.max-examples = 30
generation.no-shrink = true
generation.database = "none"
phases.stateful.max-steps = 25
# schemathesis's defaults, plus 413: a body over ORCH_MAX_BODY_BYTES is refused as too large
# before it is validated (a JSON schema cannot state a size in bytes)
checks.negative_data_rejection.expected-statuses = [
    "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
"""
# A tenant without quotas or sandbox ceilings: per-tenant policy is not in the (global) document
UNLIMITED = {"max_concurrent_runs": None, "requests_per_second": None, "burst": None,
             "sandbox": dict.fromkeys(["wall_s", "cpu_s", "memory_mb", "output_kb", "workspace_mb"])}
HOOKS = "tests.reliability.schemathesis_hooks"  # what JSON Schema cannot say about valid requests


async def schemathesis(url: str, workdir: Path) -> tuple[int, str]:
    """Run ``schemathesis run`` with every check against ``url``; its exit code and output."""
    config = workdir / "schemathesis.toml"
    config.write_text(CONFIG)
    argv = ["-m", "schemathesis.cli", "--config-file", str(config), "--no-color",
            "run", f"{url}/openapi.json", "--checks", "all"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": HOOKS, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(sys.executable, *argv, cwd=workdir, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


async def test_the_live_service_conforms_to_its_openapi_document(make_settings: Any, tmp_path: Path) -> None:
    async with running_sim("llama-3.1-8b-h100", speed=1000) as sim_url:  # a fuzzed call takes milliseconds
        settings = make_settings(  # long-polls and generations kept short, the run bounded
            api_keys={KEY: "tenant-a"}, worker_enabled=False, max_wait_seconds=0.2, max_tokens_ceiling=64,
            default_limits=UNLIMITED, backends=[{"name": "sim-0", "kind": "sglang", "url": sim_url}])
        async with running_server(settings) as url:
            code, out = await schemathesis(url, tmp_path)
    assert code == 0, report(out)


def report(out: str) -> str:
    """Schemathesis's failures and summary, each line cut short (fuzzed bodies are long)."""
    failures = out[out.find("FAILURES"):] if "FAILURES" in out else out
    return "\n".join(line[:400] for line in failures.splitlines())[:40_000]

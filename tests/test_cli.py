"""The ``orchestrator`` CLI as a user runs it: a subprocess against a live service process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import ROOT, ServiceProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    tmp = tmp_path_factory.mktemp("cli")
    proc = ServiceProcess({"ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp}/orch.db",
                           "ORCH_API_KEYS": "sk-cli=cli,sk-orch-dev=dev", "ORCH_WORKER_POLL_SECONDS": "0.2"},
                          tmp / "svc.log").start()
    yield proc
    proc.stop()


def cli(service: ServiceProcess, *args: str, key: str | None = "sk-cli", stdin: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess; ``key=None`` passes no ``--api-key``, ``env`` replaces ``ORCH_API_KEY``."""
    key_args = ["--api-key", key] if key is not None else []
    environ = {k: v for k, v in os.environ.items() if k != "ORCH_API_KEY"} | (env or {})
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "--base-url", service.url, *key_args, *args],
                          capture_output=True, text=True, input=stdin, timeout=60, cwd=ROOT, env=environ)


def test_submit_follow_prints_live_progress_and_exits_0(service: ServiceProcess, tmp_path: Path) -> None:
    spec = tmp_path / "run.json"
    spec.write_text(json.dumps({"workflow": "demo", "input": {"steps": 2, "step_seconds": 0.1}}))
    out = cli(service, "runs", "submit", str(spec), "--follow")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("submitted run_")
    assert any("step.completed" in line for line in lines) and any("run.succeeded" in line for line in lines)
    final = json.loads(out.stdout[out.stdout.index("{\n"):])
    assert final["status"] == "succeeded" and final["output"] == {"steps": 2, "total": 1}


def test_failed_run_exits_1(service: ServiceProcess) -> None:
    out = cli(service, "runs", "submit", "-", "--follow",
              stdin=json.dumps({"workflow": "demo", "input": {"steps": 2, "step_seconds": 0, "fail_at_step": 0}}))
    assert out.returncode == 1 and "run.failed" in out.stdout


def test_get_list_cancel_events(service: ServiceProcess) -> None:
    out = cli(service, "runs", "submit", "-", stdin=json.dumps({"workflow": "sleep", "input": {"seconds": 60}}))
    assert out.returncode == 0, out.stderr
    run_id = json.loads(out.stdout)["id"]
    assert run_id in cli(service, "runs", "list", "--workflow", "sleep").stdout
    cancelled = cli(service, "runs", "cancel", run_id)
    assert cancelled.returncode == 0 and run_id in cancelled.stdout
    got = json.loads(cli(service, "runs", "get", run_id, "--wait", "10").stdout)
    assert got["status"] == "cancelled"
    events = cli(service, "runs", "events", run_id).stdout
    assert "run.queued" in events and "run.cancelled" in events


def test_errors_are_one_line_and_exit_2(service: ServiceProcess) -> None:
    bad_key = cli(service, "runs", "list", key="nope")
    assert bad_key.returncode == 2 and bad_key.stderr.strip().count("\n") == 0
    assert "invalid_api_key" in bad_key.stderr and "Traceback" not in bad_key.stderr
    missing = cli(service, "runs", "get", "run_00000000000000000000000000")
    assert missing.returncode == 2 and "run_not_found" in missing.stderr


def test_key_defaults_to_the_dev_key_and_orch_api_key_overrides_it(service: ServiceProcess) -> None:
    """No key anywhere: the CLI sends ``sk-orch-dev`` (here mapped to tenant ``dev``, as an
    unconfigured service does); ``ORCH_API_KEY`` and then ``--api-key`` win over it."""
    submitted = cli(service, "runs", "submit", "-", key=None,
                    stdin=json.dumps({"workflow": "echo", "input": {"message": "hi"}}))
    assert submitted.returncode == 0, submitted.stderr
    dev_run = json.loads(submitted.stdout)["id"]
    assert dev_run in cli(service, "runs", "list", key=None).stdout
    as_cli = cli(service, "runs", "list", key=None, env={"ORCH_API_KEY": "sk-cli"})
    assert as_cli.returncode == 0 and dev_run not in as_cli.stdout  # another tenant's run
    flag_wins = cli(service, "runs", "list", key="nope", env={"ORCH_API_KEY": "sk-cli"})
    assert flag_wins.returncode == 2 and "invalid_api_key" in flag_wins.stderr
    assert "sk-orch-dev" in cli(service, "--help", key=None).stdout

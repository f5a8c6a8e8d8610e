"""The chart's tools: .venv-helm (Helm's Go library and friends, Python 3.12+), .node-deploy
(TypeScript and Grafana's schema types) and promtool, all installed by `make deploy-tools`.

Missing tools skip these tests on a developer's machine and fail them in CI (CI=true), so a
CI run can never pass without having rendered the chart."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "orchestrator"
PROFILES = CHART / "profiles"
CHARTCHECK = ROOT / "deploy" / "helm" / "chartcheck.py"
HELM_PY = ROOT / ".venv-helm" / "bin" / "python"
TSC = ROOT / ".node-deploy" / "node_modules" / ".bin" / "tsc"
GRAFANA_SCHEMA = ROOT / ".node-deploy" / "node_modules" / "@grafana" / "schema"


def need(path: Path | None, what: str) -> Path:
    """The tool, or a skip (developer) / failure (CI) that says how to get it."""
    if path is not None and path.exists():
        return path
    message = f"{what} is missing: run `make deploy-tools`"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def chartcheck() -> Callable[[str, Any], Any]:
    """Run a chartcheck.py command in .venv-helm with a JSON stdin; returns its JSON output."""
    python = need(HELM_PY, ".venv-helm")

    def run(command: str, payload: Any = None) -> Any:
        proc = subprocess.run([str(python), str(CHARTCHECK), command], input=json.dumps(payload or []),
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout)

    return run


@pytest.fixture(scope="session")
def promtool() -> str:
    return str(need(Path(shutil.which("promtool") or "/nonexistent"), "promtool (Debian package prometheus)"))


def job(command: str, *profiles: str, values: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """One chartcheck batch job: the chart with profile overlays and extra values."""
    return {"command": command, "chart": str(CHART), "values": [str(PROFILES / f"{p}.yaml") for p in profiles],
            "set": [values] if values else [], **extra}

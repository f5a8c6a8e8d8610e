"""The chart's tools: .venv-helm (Helm's Go library and friends, Python 3.12+) and .node-deploy
(TypeScript and Grafana's schema types), installed by `make deploy-tools`, and promtool (Debian's
prometheus package, installed by .ci/run as root).

A missing tool skips the tests that need it, naming the tool and how to get it: a machine without
Python 3.12+, npm or root still passes `make test`. That the chart is really checked where it can
be is `make deploy-tools`'s job: where Python 3.12+ and npm are present, a failed install fails it."""

from __future__ import annotations

import json
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


HOW_HELM = "run `make deploy-tools` (needs a Python 3.12+: pyenv, python3.12 on PATH, or PY_HELM=)"
HOW_NODE = "run `make deploy-tools` (needs npm)"
HOW_PROMTOOL = "install Debian's prometheus package (`apt-get install prometheus`, as root), or put promtool on PATH"


def need(path: Path | None, what: str, how: str) -> Path:
    """The tool, or a skip that names it and says how to get it."""
    if path is not None and path.exists():
        return path
    pytest.skip(f"{what} is missing: {how}")


@pytest.fixture(scope="session")
def chartcheck() -> Callable[[str, Any], Any]:
    """Run a chartcheck.py command in .venv-helm with a JSON stdin; returns its JSON output."""
    python = need(HELM_PY, "Helm's Go library (.venv-helm)", HOW_HELM)

    def run(command: str, payload: Any = None) -> Any:
        proc = subprocess.run([str(python), str(CHARTCHECK), command], input=json.dumps(payload or []),
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout)

    return run


@pytest.fixture(scope="session")
def promtool() -> str:
    found = shutil.which("promtool")
    return str(need(Path(found) if found else None, "promtool", HOW_PROMTOOL))


def job(command: str, *profiles: str, values: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """One chartcheck batch job: the chart with profile overlays and extra values."""
    return {"command": command, "chart": str(CHART), "values": [str(PROFILES / f"{p}.yaml") for p in profiles],
            "set": [values] if values else [], **extra}

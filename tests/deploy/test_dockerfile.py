"""The Dockerfile cannot be built here (no Docker engine): hadolint lints it, and these tests
hold it to the project and the chart (packages copied, entry point, non-root user the chart's
securityContext expects, no build tools in the final stage), and build the wheel it installs."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import CHART, HELM_PY, HOW_HELM, ROOT, need

DOCKERFILE = (ROOT / "Dockerfile").read_text()
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def stages() -> list[str]:
    """The text of each build stage, in order."""
    return re.split(r"^FROM ", DOCKERFILE, flags=re.M)[1:]


@pytest.mark.slow
def test_hadolint_passes() -> None:
    hadolint = need(HELM_PY.parent / "hadolint", "hadolint (.venv-helm)", HOW_HELM)
    proc = subprocess.run([str(hadolint), "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_hadolint_catches_a_bad_instruction(tmp_path: Path) -> None:
    hadolint = need(HELM_PY.parent / "hadolint", "hadolint (.venv-helm)", HOW_HELM)
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.replace("RUN groupadd", "RUN apt-get install gcc && groupadd", 1))
    proc = subprocess.run([str(hadolint), str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3008" in proc.stdout  # unpinned apt package


def test_multi_stage_non_root_and_no_build_tools_in_the_final_stage() -> None:
    build, runtime = stages()
    assert build.split()[1:3] == ["AS", "build"] and runtime.split()[1:3] == ["AS", "runtime"]
    assert "COPY --from=build /opt/venv /opt/venv" in runtime
    assert not re.search(r"\b(pip install|apt-get|gcc|build-essential|make)\b", runtime)
    [user] = re.findall(r"^USER (\S+)", runtime, flags=re.M)
    uid, gid = user.split(":")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert int(uid) == values["podSecurityContext"]["runAsUser"] != 0
    assert int(gid) == values["podSecurityContext"]["runAsGroup"]


def test_image_holds_every_package_and_runs_the_cli() -> None:
    packages = {p.rstrip("*") for p in PROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set(re.findall(r"^COPY (\w+)/ \1/$", DOCKERFILE, flags=re.M))
    assert copied == packages | {"sdk"}  # the SDK is its own distribution (sdk/), the CLI needs it
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    assert packages | {"sdk", "pyproject.toml", "README.md"} <= allowed
    assert re.search(r'^ENTRYPOINT \["orchestrator"\]$', DOCKERFILE, flags=re.M)
    assert "orchestrator" in PROJECT["project"]["scripts"]
    # The chart's workloads call the image with these; each must exist in the installed packages.
    assert (ROOT / "scheduler" / "sim" / "server.py").exists() and (ROOT / "tools" / "sandbox" / "agent.py").exists()


@pytest.mark.slow
def test_the_wheel_the_image_installs_carries_the_migrations(tmp_path: Path) -> None:
    """`pip install .` in the build stage installs this wheel: it must hold the Alembic files,
    or `orchestrator migrate` in the image would find no migrations."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    [wheel] = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "orchestrator/db/migrations/env.py" in names
    assert any(re.fullmatch(r"orchestrator/db/migrations/versions/\w+\.py", n) for n in names)
    assert "scheduler/sim/server.py" in names and "tools/sandbox/agent.py" in names

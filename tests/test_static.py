"""Lint and types, in `make test`: ``ruff check`` and ``mypy`` over the project's packages.

Both run as subprocesses with the configuration in pyproject.toml (``[tool.ruff]``,
``[tool.mypy]``) and the pinned versions of the dev extra, so a finding fails the suite the
same way on every machine; their whole report is the failure message. mypy keeps its
incremental cache in ``.mypy_cache``: the first run takes minutes on a loaded machine, the
next ones seconds for unchanged modules.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [p for p in ("orchestrator", "scheduler", "tools", "agents", "evolve", "sdk/orchestrator_sdk")
            if (ROOT / p).is_dir()]


def run_tool(module: str, *args: str) -> None:
    """``python -m <module>`` from this interpreter (the venv's pinned tools), at the repository
    root; fails the test with the tool's whole report when it finds anything."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        pytest.fail(f"{module} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}", pytrace=False)


def test_ruff_finds_nothing() -> None:
    run_tool("ruff", "check", "--no-cache", "--output-format", "concise", *PACKAGES)


def test_mypy_finds_nothing() -> None:
    run_tool("mypy", *PACKAGES)

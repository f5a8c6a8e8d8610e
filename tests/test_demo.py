"""`make demo` proves the product only if its agent really calls tools and answers: run
examples/demo.py as `make demo` does (its own service process, the local SmolLM2, SQLite) and
check what it printed, not just its exit code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_agent_runs_its_tool_and_answers_with_what_it_printed():
    proc = subprocess.run([sys.executable, "examples/demo.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, check=False)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "shell -> ok" in out and "the secret word is BANANA" in out, out  # the tool ran, its output shown
    assert "stop reason final_answer" in out and "malformed_arguments" not in out, out
    answer = out.rsplit("answer: ", 1)[1]
    assert "banana" in answer.lower(), out  # the answer comes from the tool's output
    assert "kv_hit_ratio" in out and "dispatches" in out, out  # the scheduler's figures are shown

"""The README's "Using it" section, copy-pasted: every ```python and ```bash block in it runs against
a service that ``make serve`` started (the Makefile's own target: its default local SmolLM2 backend
and development key), with only where the service listens changed.

The blocks are read from README.md at collection, so the README and this test cannot drift: a block
added to the section is run too, and must match one of ``EXPECTED`` below (what it promises to
print). The service gets a free port, a SQLite file and a sandbox root in a temporary folder;
Python blocks run with this interpreter (the README says ``.venv/bin/python``), bash blocks with
``bash -e``, both in a temporary folder with a ``.venv`` link to the repository's, with no
``ORCH_*`` variable but ``ORCH_BASE_URL`` (the CLI's documented way to name another address), so
the CLI's default key is the one exercised."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import ROOT, free_port

pytestmark = pytest.mark.slow

SECTION = "## Using it"
DOCUMENTED_URL = "http://127.0.0.1:8080"
READY_TIMEOUT_S = 900  # the first start converts the model's weights (minutes on a loaded CPU)


def readme_snippets(readme: Path = ROOT / "README.md") -> list[tuple[str, str]]:
    """``(language, code)`` of each python or bash block in the README's "Using it" section."""
    text = readme.read_text()
    start = text.index(f"\n{SECTION}\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end != -1 else len(text)]
    return re.findall(r"^```(python|bash)\n(.*?)^```$", section, flags=re.M | re.S)


def _sdk_run(out: str) -> None:
    lines = out.splitlines()
    assert any("run.succeeded" in line for line in lines), out
    assert lines[-1].startswith("{'steps': 3"), out  # the run's output


def _cli_follow(out: str) -> None:
    assert out.startswith("submitted run_") and '"status": "succeeded"' in out, out


def _openai_answer(out: str) -> None:
    answer = out.strip()
    assert answer and answer != "None", out


# What each kind of block promises, recognised by a call it makes.
EXPECTED: dict[str, Callable[[str], None]] = {
    "client.runs.stream(": _sdk_run,
    "orchestrator runs submit": _cli_follow,
    "chat.completions.create(": _openai_answer,
}
SNIPPETS = readme_snippets()


def expectation(code: str) -> Callable[[str], None]:
    checks = [check for marker, check in EXPECTED.items() if marker in code]
    assert len(checks) == 1, f"not exactly one expectation for this README block (see EXPECTED):\n{code}"
    return checks[0]


def test_the_section_has_its_snippets_and_each_has_an_expectation() -> None:
    assert {lang for lang, _ in SNIPPETS} == {"python", "bash"}, SNIPPETS
    assert sorted(expectation(code).__name__ for _, code in SNIPPETS) == sorted(f.__name__ for f in EXPECTED.values())


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``make serve`` (without re-installing the venv) on a free port; yields its base URL."""
    make = shutil.which("make")
    assert make, "the README's commands need make"
    tmp = tmp_path_factory.mktemp("readme-service")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "MAKE"))}
    env |= {"ORCH_PORT": str(port), "ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp}/orch.db",
            "ORCH_SANDBOX_ROOT": str(tmp / "sandboxes")}
    log_path = tmp / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([make, "-s", "-o", ".venv/.installed", "serve"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"make serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"make serve not ready in {READY_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # make and the service it started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.parametrize(("lang", "code"), SNIPPETS, ids=[f"{i}-{lang}" for i, (lang, _) in enumerate(SNIPPETS)])
def test_readme_snippet_runs_as_written(service: str, lang: str, code: str, tmp_path: Path) -> None:
    check = expectation(code)
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    code = code.replace(DOCUMENTED_URL, service)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")} | {"ORCH_BASE_URL": service}
    argv = [sys.executable, "-c", code] if lang == "python" else ["bash", "-e", "-c", code]
    out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    check(out.stdout)

"""A real SGLang 0.5.23 server (CPU, SmolLM2-135M-Instruct) for the `sglang` tier.

Installed and served by ``../shared/sglang-cpu`` (install.sh is idempotent: several
minutes and 3.7 GB the first time, nothing after). Never skipped: a missing install is
installed. The scripts' progress lines go to the terminal, past pytest's capture, so a
first run that installs for minutes says what it is doing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tests.servers import ROOT, free_port

SGLANG_CPU = Path(os.environ.get("ORCH_SGLANG_CPU_DIR", ROOT.parent / "shared" / "sglang-cpu"))


@contextmanager
def sglang_server(config: pytest.Config, *flags: str) -> Iterator[str]:
    """A real SGLang server on a free port (installed first if missing), stopped on exit; yields
    its base URL. Capture is suspended meanwhile: the scripts' stderr (their progress) is the
    terminal's."""
    port = str(free_port())
    with config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(f"\n[sglang tier] SGLang for CPU from {SGLANG_CPU}: installing if needed (several minutes "
              f"and 3.7 GB the first time), then starting a server{''.join(' ' + f for f in flags)} (a minute or two)",
              file=sys.stderr, flush=True)
        subprocess.run(["bash", str(SGLANG_CPU / "install.sh")], check=True, timeout=1200)
        out = subprocess.run(["bash", str(SGLANG_CPU / "serve.sh"), port, *flags], check=True, timeout=400,
                             stdout=subprocess.PIPE, text=True)
    try:
        yield out.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(SGLANG_CPU / "stop.sh"), port], timeout=60)


@pytest.fixture(scope="session")
def sglang_url(pytestconfig: pytest.Config) -> Iterator[str]:
    with sglang_server(pytestconfig) as url:
        yield url

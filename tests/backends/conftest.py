"""A real SGLang 0.5.23 server (CPU, SmolLM2-135M-Instruct) for the `sglang` tier.

Installed and served by ``../shared/sglang-cpu`` (install.sh is idempotent: about
2.5 minutes the first time, nothing after). Never skipped: a missing install is
installed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests.servers import ROOT, free_port

SGLANG_CPU = Path(os.environ.get("ORCH_SGLANG_CPU_DIR", ROOT.parent / "shared" / "sglang-cpu"))


@pytest.fixture(scope="session")
def sglang_url() -> Iterator[str]:
    subprocess.run(["bash", str(SGLANG_CPU / "install.sh")], check=True, timeout=1200)
    port = str(free_port())
    out = subprocess.run(["bash", str(SGLANG_CPU / "serve.sh"), port], check=True, timeout=400,
                         capture_output=True, text=True)
    try:
        yield out.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(SGLANG_CPU / "stop.sh"), port], timeout=60)

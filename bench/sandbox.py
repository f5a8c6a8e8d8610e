"""Sandbox benchmark: what isolation costs per tool command, and what preparing a sandbox
ahead of need saves at a program's first tool call.

    .venv/bin/python bench/sandbox.py --quick --json

Side by side in one run (alternating, so machine noise hits both):
- ``exec``: ``/bin/true`` and a ``python3 -c`` in the subprocess sandbox (uid drop, rlimits,
  network / PID / mount namespaces) against a bare ``asyncio`` subprocess of the same command;
- ``acquire``: a prepared sandbox (``SandboxPool.prepare`` some time before) against one
  created cold at ``acquire``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.sandbox import SandboxPool, SubprocessSandbox  # noqa: E402


async def bare(argv: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    await proc.communicate()


def ms(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"p50_ms": round(1000 * statistics.median(xs), 2), "p95_ms": round(1000 * xs[int(0.95 * (len(xs) - 1))], 2)}


async def main(quick: bool) -> dict[str, object]:
    n = 30 if quick else 200
    root = Path(tempfile.mkdtemp(prefix="bench-sandbox-"))
    sb = await SubprocessSandbox.create(root, "bench")
    out: dict[str, object] = {"labels": sb.info().labels, "n": n}
    for name, argv in (("true", ["/bin/true"]), ("python", [sb.python or "python3", "-c", "print(1)"])):
        boxed, plain = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            r = await sb.exec(argv)
            boxed.append(time.perf_counter() - t0)
            assert r.exit_code == 0, r
            t0 = time.perf_counter()
            await bare(argv)
            plain.append(time.perf_counter() - t0)
        out[f"exec_{name}"] = {"sandbox": ms(boxed), "bare": ms(plain),
                               "overhead_ms_p50": round(1000 * (statistics.median(boxed) - statistics.median(plain)), 2),
                               "ratio_p50": round(statistics.median(boxed) / statistics.median(plain), 2)}
    await sb.close()

    async def factory(pid: str) -> SubprocessSandbox:
        return await SubprocessSandbox.create(root, pid)

    pool = SandboxPool(factory, max_sandboxes=4 * n)
    cold, warm = [], []
    for i in range(n):
        pool.prepare(f"w{i}")
        await asyncio.sleep(0.05)  # the program's LLM turn, during which the sandbox is made
        t0 = time.perf_counter()
        await pool.acquire(f"w{i}")
        warm.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await pool.acquire(f"c{i}")
        cold.append(time.perf_counter() - t0)
        await pool.release(f"w{i}")
        await pool.release(f"c{i}")
    await pool.close()
    out["acquire"] = {"prepared": ms(warm), "cold": ms(cold),
                      "speedup_p50": round(statistics.median(cold) / max(statistics.median(warm), 1e-6), 1)}
    os.rmdir(root) if not any(root.iterdir()) else None
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = asyncio.run(main(args.quick))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))

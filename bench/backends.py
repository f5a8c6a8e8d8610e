"""Backend benchmark: the local engine's prefill and decode speed, and what its prefix cache
saves when a prompt extends a cached one (a program's next turn) against re-prefilling it.

    .venv/bin/python bench/backends.py --quick --json

Side by side in one run: the cached and the uncached extension are timed alternately on
the same prompts, so machine noise hits both. The simulator part runs agent programs on a
virtual-time cluster and reports how fast virtual time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scheduler.backends import GenerateRequest  # noqa: E402
from scheduler.local import LocalEngine, load_model  # noqa: E402
from scheduler.sim.cluster import AgentWorkload, VirtualCluster  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def context(n_tokens: int, tag: int) -> list[int]:
    """A deterministic token sequence of ``n_tokens`` (ordinary vocabulary ids)."""
    return [1000 + (i * 7919 + tag * 104729) % 30000 for i in range(n_tokens)]


async def timed(engine: LocalEngine, req: GenerateRequest) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    gen = await engine.generate(req)
    return time.perf_counter() - t0, gen.usage.cached_tokens, gen.usage.completion_tokens


async def run(quick: bool) -> dict:
    loaded = load_model()
    engine = LocalEngine(loaded, cache_tokens=32768)
    prefix_len, extension, decode_tokens, reps = (400, 16, 32, 3) if quick else (1500, 32, 128, 5)
    log(f"model loaded in {loaded.load_seconds:.2f} s (converted: {loaded.converted})")

    # Prefill: a fresh prompt, one generated token.
    prefill = []
    for r in range(reps):
        engine.cache.clear()
        s, _, _ = await timed(engine, GenerateRequest(input_ids=context(prefix_len, 100 + r), max_tokens=1))
        prefill.append(prefix_len / s)
    # Decode: tokens per second beyond the prefill of a short prompt.
    engine.cache.clear()
    short = context(16, 7)
    s_one, _, _ = await timed(engine, GenerateRequest(input_ids=short, max_tokens=1))
    s_many, _, n = await timed(engine, GenerateRequest(input_ids=short, max_tokens=decode_tokens, stop=None))
    decode_tps = (n - 1) / max(1e-9, s_many - s_one)

    # A program's next turn: the previous context plus a few new tokens.
    cached_s, uncached_s, hits = [], [], []
    for r in range(reps):
        base = context(prefix_len, r)
        turn = GenerateRequest(input_ids=base + context(extension, 500 + r), max_tokens=1)
        engine.cache.clear()
        await engine.generate(GenerateRequest(input_ids=base, max_tokens=1))  # the earlier turn
        s, cached, _ = await timed(engine, turn)
        cached_s.append(s)
        hits.append(cached)
        engine.cache.clear()
        s, _, _ = await timed(engine, turn)
        uncached_s.append(s)
    result = {
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "quick": quick,
        "local_engine": {
            "model": loaded.name,
            "load_s": round(loaded.load_seconds, 3),
            "prefill_tokens_per_s": round(statistics.median(prefill), 1),
            "decode_tokens_per_s": round(decode_tps, 1),
            "prefix_tokens": prefix_len,
            "extension_tokens": extension,
            "extension_cached_s": round(statistics.median(cached_s), 4),
            "extension_full_prefill_s": round(statistics.median(uncached_s), 4),
            "cached_tokens_reported": min(hits),
            "cached_prefix_speedup": round(statistics.median(uncached_s) / statistics.median(cached_s), 2),
        },
    }
    await engine.close()
    result["simulator"] = simulate(quick)
    return result


def simulate(quick: bool) -> dict:
    """Agent programs on a virtual-time cluster (llama-3.1-8b-h100 preset)."""
    engines, programs, seconds = (2, 40, 600) if quick else (8, 200, 3600)
    cluster = VirtualCluster(engines, "llama-3.1-8b-h100", seed=1)
    t0 = time.perf_counter()
    m = cluster.run_agents(AgentWorkload(programs=programs), duration_s=seconds)
    wall = time.perf_counter() - t0
    return {"engines": engines, "programs": programs, "virtual_s": seconds, "wall_s": round(wall, 2),
            "events": m.events, "events_per_s": round(m.events / wall), "virtual_s_per_wall_s": round(seconds / wall, 1),
            "llm_calls": m.requests_finished, "cache_hit_ratio": round(m.cache_hit_ratio, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: under a minute")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = asyncio.run(run(args.quick))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

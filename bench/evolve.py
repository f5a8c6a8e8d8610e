"""Squeeze-Evolve benchmark: the same evolve configuration run single-model (the strongest model
everywhere) and routed (strong / weak by confidence, plus the lite tier), side by side.

Both runs go through the real service (its worker, checkpoints, the scheduler runtime) to
simulated SGLang servers that know the bundled GSM8K problems' answers and are right with a
set probability (``scheduler.sim.script.ProblemScript``): a strong, expensive model and a weak,
cheap one whose prompt confidence is higher on right answers, with noise. Each run gets fresh
simulator processes so neither inherits the other's prefix cache.

    .venv/bin/python bench/evolve.py --quick --json

Printed: cost ratio (single / routed), accuracy of each, model calls per tier, and the
orchestration overhead: the share of the run's wall time with no model call in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the repository's packages and test servers

from evolve.data import gsm8k_test  # noqa: E402
from orchestrator import Settings  # noqa: E402
from orchestrator_sdk import AsyncClient  # noqa: E402
from tests.servers import SimServerProcess, running_server  # noqa: E402

KEY = "sk-bench"
STRONG = {"name": "strong", "price_in": 3.0, "price_out": 15.0, "accuracy": 0.6}
WEAK = {"name": "weak", "price_in": 0.1, "price_out": 0.4, "accuracy": 0.3,
        "confidence_correct": 2.2, "confidence_wrong": 1.4, "confidence_noise": 1.2}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sim(tmp: Path, model: dict[str, Any], problems: list[dict[str, str]], seed: int, preset: str,
         speed: float) -> SimServerProcess:
    script = {"kind": "problems", "seed": seed, "accuracy": model["accuracy"], "reasoning_tokens": 40,
              "problems": [{"question": p["question"], "answer": p["answer"]} for p in problems],
              **{k: v for k, v in model.items() if k.startswith("confidence_")}}
    path = tmp / f"{model['name']}.json"
    path.write_text(json.dumps(script))
    return SimServerProcess("--preset", preset, "--speed", str(speed), "--script", str(path),
                            "--served-model-name", model["name"]).start()


def evolve_spec(problems: list[dict[str, str]], models: list[dict[str, Any]], loops: int) -> dict[str, Any]:
    return {"problems": problems, "population": 8, "k": 3, "groups": 8, "loops": loops,
            "percentiles": [25] if len(models) == 2 else None, "lite_fraction": 0.25 if len(models) == 2 else 0.0,
            "fitness": "confidence", "top_k": 20, "seed": 7, "max_concurrency": 64,
            "models": [{"name": m["name"], "price_in": m["price_in"], "price_out": m["price_out"],
                        "max_tokens": 128, "prompt_logprobs": m is WEAK} for m in models]}


async def one(label: str, models: list[dict[str, Any]], problems: list[dict[str, str]], loops: int,
              preset: str, speed: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        sims = {m["name"]: _sim(tmp, m, problems, seed, preset, speed) for seed, m in enumerate([STRONG, WEAK], 1)
                if m in models}
        settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp}/bench.db", api_keys={KEY: "bench"},
                            log_json=False, worker_poll_seconds=0.05, sandbox_root=str(tmp / "sb"),
                            backends=[{"name": n, "kind": "sglang", "url": s.url} for n, s in sims.items()],
                            tenant_limits={"bench": {"max_concurrent_runs": 100, "requests_per_second": 1000,
                                                     "burst": 1000}})
        try:
            async with running_server(settings) as url, AsyncClient(base_url=url, api_key=KEY) as client:
                t0, cpu0 = time.perf_counter(), time.process_time()
                run = await client.runs.create("evolve", input=evolve_spec(problems, models, loops))
                final = await client.runs.wait(run.id, timeout=900)
                elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        finally:
            for s in sims.values():
                s.kill()
    if final.status != "succeeded":
        raise RuntimeError(f"{label} run {final.status}: {final.error}")
    out = final.output
    total = out["ledger"]["total"]
    run_wall = (final.finished_at or 0) - (final.started_at or 0)
    busy = out["timing"]["model_busy_s"]
    _log(f"{label}: accuracy {out['accuracy']:.3f}, cost ${total['cost_usd']:.4f}, {run_wall:.1f} s")
    return {
        "accuracy": out["accuracy"], "cost_usd": total["cost_usd"], "tier_calls": total["tier_calls"],
        "lite": total["lite"], "tokens": total["tokens"],
        "calls": {n: {"generate": m["calls"], "score": m["scoring_calls"]} for n, m in total["models"].items()},
        "run_wall_s": round(run_wall, 3), "client_wall_s": round(elapsed, 3), "model_busy_s": round(busy, 3),
        "overhead_ratio": round(max(0.0, run_wall - busy) / run_wall, 4) if run_wall > 0 else None,
        "overhead_in_loops_ratio": round(out["timing"]["overhead_ratio"], 4),
        # CPU of this process (the service: worker, runtime, backend clients, store; and the SDK's
        # long-poll) per model call: what the orchestration costs even while calls overlap it
        "service_cpu_s": round(cpu, 3),
        "service_cpu_ms_per_call": round(1000 * cpu / max(1, sum(m["calls"] + m["scoring_calls"]
                                                                   for m in total["models"].values())), 3),
    }


async def run(quick: bool, n_problems: int | None, loops: int | None, preset: str, speed: float) -> dict[str, Any]:
    n = n_problems or (8 if quick else 50)
    loops = loops or (3 if quick else 4)
    problems = gsm8k_test(n)
    t0 = time.perf_counter()
    single = await one("single", [STRONG], problems, loops, preset, speed)
    routed = await one("routed", [STRONG, WEAK], problems, loops, preset, speed)
    return {
        "problems": n, "loops": loops, "population": 8, "k": 3, "groups": 8, "percentiles": [25],
        "lite_fraction": 0.25, "sim_preset": preset, "sim_speed": speed,
        "models": {"strong": STRONG, "weak": WEAK},
        "single": single, "routed": routed,
        "ratios": {"cost_single_over_routed": round(single["cost_usd"] / routed["cost_usd"], 3)
                   if routed["cost_usd"] else None,
                   "accuracy_routed_minus_single": round(routed["accuracy"] - single["accuracy"], 4),
                   "wall_single_over_routed": round(single["run_wall_s"] / routed["run_wall_s"], 3)
                   if routed["run_wall_s"] else None},
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 problems, 3 loops (< 1 minute)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--problems", type=int, help="how many bundled GSM8K problems (max 200)")
    ap.add_argument("--loops", type=int)
    ap.add_argument("--preset", default="llama-3.1-8b-h100", help="simulated engine cost model")
    ap.add_argument("--speed", type=float, default=10.0, help="simulated seconds per wall second")
    args = ap.parse_args()
    result = asyncio.run(run(args.quick, args.problems, args.loops, args.preset, args.speed))
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['problems']} GSM8K problems, {result['loops']} loops, N=8 K=3 M=8, percentiles [25], "
          f"lite 0.25; sim {result['sim_preset']} x{result['sim_speed']}")
    print(f"{'':>8} {'accuracy':>9} {'cost $':>10} {'run s':>7} {'overhead':>9} {'cpu ms/call':>11}  calls per tier")
    for label in ("single", "routed"):
        r = result[label]
        print(f"{label:>8} {r['accuracy']:>9.3f} {r['cost_usd']:>10.4f} {r['run_wall_s']:>7.2f} "
              f"{r['overhead_ratio']:>9.3f} {r['service_cpu_ms_per_call']:>11.2f}  {r['tier_calls']}")
    ratios = result["ratios"]
    print(f"cost single/routed {ratios['cost_single_over_routed']}x, accuracy routed-single "
          f"{ratios['accuracy_routed_minus_single']:+.3f}; wall {result['wall_s']} s")


if __name__ == "__main__":
    main()

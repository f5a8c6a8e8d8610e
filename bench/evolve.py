"""Squeeze-Evolve benchmark on simulated models: accuracy against cost, single-model vs routed.

Every arm runs the same evolve configuration through the real service (its worker,
checkpoints, the scheduler runtime) to simulated SGLang servers that know the bundled GSM8K
problems' answers (``scheduler.sim.script.ProblemScript``). Arms, for every seed:

- ``single-strong``: the strong, expensive model everywhere (no routing, no scoring);
- ``single-weak``: the weak, cheap model everywhere;
- ``routed-pP``: loop 0 on the strong model, later groups routed by confidence (scored by the
  weak model) at percentile P (the least confident P % of a problem's groups to the strong
  model, the rest to the weak one, the most confident quarter of those to lite), for each P.

The simulated models are the harder ones (``--easy`` gives the original ones): each problem
has a latent difficulty shared by both models (a model is right with probability
logistic(skill - difficulty), the skill set so the mean over problems is its ``accuracy``); a
wrong answer is often the problem's one plausible mistake (its distractor, the same for both
models), so a vote can settle on it; a model aggregating candidates it cannot solve adopts one
of them or makes its own mistake; and the weak model's confidence in a candidate is its own
belief in that answer plus noise, not the ground truth. The parameters are chosen, not fitted:
``MODELS`` says why.

Per seed, both simulators and the service are started once and the arms run one after the
other, the simulators' prefix caches flushed between them (cost comes from the ledger, which
does not discount cached tokens, so the cache only moves wall times). The same seed gives every
arm the same loop 0 (the strong model's first population), so arms are compared on the same
draws. Accuracy is pooled over problems x seeds with a 95 % bootstrap interval over problems
(seeds share problems: the problem is the unit resampled), and so is each arm's difference from
``single-strong``.

    .venv/bin/python bench/evolve.py --quick --json          # 8 problems, 3 loops, 1 seed: < 1 minute
    .venv/bin/python bench/evolve.py --problems 30 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the repository's packages and test servers

from evolve.data import gsm8k_test  # noqa: E402
from orchestrator import Settings  # noqa: E402
from orchestrator_sdk import AsyncClient  # noqa: E402
from scheduler.sim.script import ProblemScript, problem_script  # noqa: E402
from tests.servers import SimServerProcess, running_server  # noqa: E402

KEY = "sk-bench"

# Why these values (chosen before any run, not tuned on the result):
# - accuracy 0.8 / 0.45: a strong and a weak model's single-sample GSM8K accuracy (a 70B-class
#   and a 1-3B-class instruct model, chain of thought), the suggestion;
# - prices: $3 / $15 and $0.1 / $0.4 per Mtok, the earlier benchmark's (frontier vs small API);
# - difficulty_sd 1.5 logits: item difficulties of benchmark questions spread over a few logits
#   in item-response fits of LLM results; at 1.5 a problem one sd harder than the mean takes
#   the strong model from 0.87 to 0.6 and the weak one from 0.43 to 0.14;
# - distractor 0.5: half of the wrong answers are the problem's one common mistake (a misread
#   step), the rest careless slips; two models that err on a problem then often agree;
# - copy 0.5: a model that cannot solve a problem, shown candidates, adopts one of them half the
#   time and otherwise makes its own mistake (aggregation both repairs and breaks answers);
# - the weak scorer's confidence: 1.4 + 0.8 x its own probability of stating the answer, +-0.6
#   uniform noise (the earlier benchmark's 2.2 / 1.4 / 1.2, now on belief instead of truth).
PROBLEM_SET: dict[str, Any] = {"difficulty_sd": 1.5, "difficulty_seed": 0, "distractor": 0.5, "copy": 0.5}
MODELS: dict[str, dict[str, Any]] = {
    "strong": {"price_in": 3.0, "price_out": 15.0, "accuracy": 0.8, **PROBLEM_SET},
    "weak": {"price_in": 0.1, "price_out": 0.4, "accuracy": 0.45, **PROBLEM_SET, "confidence_from": "belief",
             "confidence_correct": 2.2, "confidence_wrong": 1.4, "confidence_noise": 1.2},
}
# The original simulated models (--easy): errors independent per call, wrong answers near the
# right one, confidence from the ground truth plus noise. Every arm's vote reaches 1.0.
EASY: dict[str, dict[str, Any]] = {
    "strong": {"price_in": 3.0, "price_out": 15.0, "accuracy": 0.6},
    "weak": {"price_in": 0.1, "price_out": 0.4, "accuracy": 0.3,
             "confidence_correct": 2.2, "confidence_wrong": 1.4, "confidence_noise": 1.2},
}
SCRIPT_KEYS = ("accuracy", "difficulty_sd", "difficulty_seed", "distractor", "copy", "confidence_from",
               "confidence_correct", "confidence_wrong", "confidence_noise")
LITE = 0.25


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def script_spec(model: dict[str, Any], problems: list[dict[str, str]], seed: int) -> dict[str, Any]:
    """The simulator's ``--script`` JSON for one model."""
    return {"kind": "problems", "seed": seed, "reasoning_tokens": 40,
            "problems": [{"question": p["question"], "answer": p["answer"]} for p in problems],
            **{k: v for k, v in model.items() if k in SCRIPT_KEYS}}


def arm_models(arm: str) -> tuple[list[str], float | None]:
    """(model names, strongest first; routing percentile or None) of an arm."""
    if arm == "single-strong":
        return ["strong"], None
    if arm == "single-weak":
        return ["weak"], None
    return ["strong", "weak"], float(arm.removeprefix("routed-p"))


def evolve_spec(problems: list[dict[str, str]], models: dict[str, dict[str, Any]], arm: str, loops: int,
                seed: int) -> dict[str, Any]:
    names, percentile = arm_models(arm)
    routed = percentile is not None
    return {"problems": problems, "population": 8, "k": 3, "groups": 8, "loops": loops,
            "percentiles": [percentile] if routed else None, "lite_fraction": LITE if routed else 0.0,
            "fitness": "confidence", "top_k": 20, "seed": 7 + seed, "max_concurrency": 64,
            "models": [{"name": n, "price_in": models[n]["price_in"], "price_out": models[n]["price_out"],
                        "max_tokens": 128, "prompt_logprobs": n == "weak"} for n in names]}


def _scoring_cost(total: dict[str, Any], models: dict[str, dict[str, Any]]) -> float:
    return sum((m.get("scoring_tokens", 0) * models[n]["price_in"]
                + m.get("scoring_output_tokens", 0) * models[n]["price_out"]) / 1e6
               for n, m in total["models"].items() if n in models)


async def run_arm(client: AsyncClient, arm: str, problems: list[dict[str, str]], models: dict[str, dict[str, Any]],
                  loops: int, seed: int) -> dict[str, Any]:
    t0, cpu0 = time.perf_counter(), time.process_time()
    run = await client.runs.create("evolve", input=evolve_spec(problems, models, arm, loops, seed))
    final = await client.runs.wait(run.id, timeout=900)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if final.status != "succeeded":
        raise RuntimeError(f"{arm} seed {seed} run {final.status}: {final.error}")
    out = final.output
    total = out["ledger"]["total"]
    run_wall = (final.finished_at or 0) - (final.started_at or 0)
    busy = out["timing"]["model_busy_s"]
    calls = sum(m["calls"] + m["scoring_calls"] for m in total["models"].values())
    scoring = _scoring_cost(total, models)
    _log(f"seed {seed} {arm}: accuracy {out['accuracy']:.3f}, cost ${total['cost_usd']:.4f}, {run_wall:.1f} s")
    return {
        "correct": [bool(a.get("correct")) for a in out["answers"]],
        "accuracy": out["accuracy"], "cost_usd": total["cost_usd"], "tier_calls": total["tier_calls"],
        "tokens": total["tokens"], "scoring_cost_usd": round(scoring, 6),
        "calls": {n: {"generate": m["calls"], "score": m["scoring_calls"]} for n, m in total["models"].items()},
        "run_wall_s": round(run_wall, 3), "client_wall_s": round(elapsed, 3), "model_busy_s": round(busy, 3),
        "overhead_ratio": round(max(0.0, run_wall - busy) / run_wall, 4) if run_wall > 0 else None,
        "scoring_ratio": out["timing"].get("scoring_ratio"),
        # CPU of this process (the service and the SDK's long-poll) per model call
        "service_cpu_ms_per_call": round(1000 * cpu / max(1, calls), 3),
    }


TRANSIENT = ("worker_lost", "NoBackendAvailable", "BackendUnavailable")


async def run_arm_retrying(client: AsyncClient, arm: str, problems: list[dict[str, str]],
                           models: dict[str, dict[str, Any]], loops: int, seed: int,
                           retries: int = 4) -> dict[str, Any]:
    """``run_arm``, run again (up to ``retries`` times) when the run failed for want of a
    simulator or a worker: on a shared, overloaded machine a simulator can miss one health check,
    and the runtime then refuses calls until the next one. Replies are functions of the seeds, so
    a rerun computes the same answers; the result counts its ``retries``."""
    for attempt in range(retries + 1):
        try:
            result = await run_arm(client, arm, problems, models, loops, seed)
            return result | {"retries": attempt}
        except RuntimeError as exc:
            if attempt == retries or not any(t in str(exc) for t in TRANSIENT):
                raise
            _log(f"seed {seed} {arm}: {exc}; running it again")
    raise AssertionError("unreachable")


async def run_seed(seed: int, arms: list[str], problems: list[dict[str, str]], models: dict[str, dict[str, Any]],
                   loops: int, preset: str, speed: float) -> dict[str, dict[str, Any]]:
    """Every arm of one seed: one pair of simulators and one service, arms one after the other."""
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        sims: dict[str, SimServerProcess] = {}
        try:
            for i, name in enumerate(("strong", "weak")):
                path = tmp / f"{name}.json"
                path.write_text(json.dumps(script_spec(models[name], problems, 2 * seed + 1 + i)))
                sims[name] = SimServerProcess("--preset", preset, "--speed", str(speed), "--script", str(path),
                                              "--served-model-name", name).start()
            settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp}/bench.db", api_keys={KEY: "bench"},
                                log_json=False, worker_poll_seconds=0.05, sandbox_root=str(tmp / "sb"),
                                # the service shares this process's event loop with heavy scoring traffic
                                # on 2 busy cores: a 15 s lease was lost there (worker_lost)
                                lease_seconds=120.0,
                                backends=[{"name": n, "kind": "sglang", "url": s.url} for n, s in sims.items()],
                                tenant_limits={"bench": {"max_concurrent_runs": 100, "requests_per_second": 1000,
                                                         "burst": 1000}})
            results = {}
            async with running_server(settings) as url, AsyncClient(base_url=url, api_key=KEY) as client, \
                    httpx.AsyncClient(timeout=10) as http:
                for arm in arms:
                    for s in sims.values():  # no arm inherits another's prefix cache
                        (await http.post(f"{s.url}/flush_cache")).raise_for_status()
                    results[arm] = await run_arm_retrying(client, arm, problems, models, loops, seed)
            return results
        finally:
            for s in sims.values():
                s.kill()


def bootstrap(per_problem: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of ``per_problem`` (problems resampled)."""
    rng = random.Random(seed)
    n = len(per_problem)
    means = sorted(sum(rng.choices(per_problem, k=n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[min(resamples - 1, int(0.975 * resamples))]


def summarize(arms: list[str], runs: dict[int, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per arm, pooled over seeds: accuracy and its interval, its difference from single-strong,
    mean cost per run and the cost ratio, calls per tier, scoring and orchestration overhead."""
    seeds = sorted(runs)
    n_problems = len(runs[seeds[0]][arms[0]]["correct"])

    def per_problem(arm: str) -> list[float]:
        return [sum(runs[s][arm]["correct"][i] for s in seeds) / len(seeds) for i in range(n_problems)]

    def mean(arm: str, key: str) -> float | None:
        values = [runs[s][arm][key] for s in seeds if runs[s][arm][key] is not None]
        return sum(values) / len(values) if values else None

    base = per_problem("single-strong") if "single-strong" in arms else None
    base_cost = mean("single-strong", "cost_usd") if base is not None else None
    out: dict[str, Any] = {}
    for arm in arms:
        acc = per_problem(arm)
        cost = mean(arm, "cost_usd") or 0.0
        tiers: dict[str, float] = {}
        for s in seeds:
            for tier, n in runs[s][arm]["tier_calls"].items():
                tiers[tier] = tiers.get(tier, 0) + n / len(seeds)
        row: dict[str, Any] = {
            "accuracy": round(sum(acc) / n_problems, 4), "accuracy_ci95": [round(x, 4) for x in bootstrap(acc)],
            "cost_usd": round(cost, 5),
            "cost_ratio_vs_single_strong": round(base_cost / cost, 3) if base_cost and cost else None,
            "tier_calls_per_run": {k: round(v, 1) for k, v in sorted(tiers.items())},
            "scoring_calls_per_run": round(sum(sum(c["score"] for c in runs[s][arm]["calls"].values())
                                               for s in seeds) / len(seeds), 1),
            "scoring_cost_share": round(sum(runs[s][arm]["scoring_cost_usd"] for s in seeds)
                                        / max(1e-12, sum(runs[s][arm]["cost_usd"] for s in seeds)), 4),
            # the loops' wall time with a scoring call in flight (it overlaps generation)
            "scoring_time_ratio": round(mean(arm, "scoring_ratio") or 0.0, 4),
            "overhead_ratio": round(mean(arm, "overhead_ratio") or 0.0, 4),
            "run_wall_s": round(mean(arm, "run_wall_s") or 0.0, 2),
            "service_cpu_ms_per_call": round(mean(arm, "service_cpu_ms_per_call") or 0.0, 2),
            "retries": sum(runs[s][arm].get("retries", 0) for s in seeds),
        }
        if base is not None and arm != "single-strong":
            diff = [a - b for a, b in zip(acc, base, strict=True)]
            row["accuracy_minus_single_strong"] = round(sum(diff) / n_problems, 4)
            row["accuracy_minus_single_strong_ci95"] = [round(x, 4) for x in bootstrap(diff, seed=1)]
        out[arm] = row
    return out


def signal(problems: list[dict[str, str]], models: dict[str, dict[str, Any]], draws: int = 32) -> dict[str, Any]:
    """What the simulated models are, on these problems, from the scripts alone (no service):
    each model's mean chance of a right answer, the share of problems whose 8-vote majority of
    bare answers is right, and the weak scorer's AUROC on the strong model's candidates."""
    scripts: dict[str, ProblemScript] = {n: problem_script(script_spec(m, problems, 2 * 0 + 1 + i))
                                         for i, (n, m) in enumerate(models.items())}
    out: dict[str, Any] = {}
    for name, script in scripts.items():
        p = [script.p_right(q) for q in script.problems]
        majority = 0
        for q, truth in script.problems.items():
            votes = [script.answer(q, s) for s in range(8)]
            majority += max(votes, key=votes.count) == truth
        out[name] = {"mean_p_right": round(sum(p) / len(p), 3), "majority_of_8_right": round(majority / len(p), 3),
                     "problems_below_half": sum(x < 0.5 for x in p)}
    strong, weak = scripts["strong"], scripts["weak"]
    scored = []
    for q, truth in strong.problems.items():
        for s in range(draws):
            answer = strong.answer(q, s)
            scored.append((weak.prompt_confidence(f"{q} draft {s}: \\boxed{{{answer}}}."), answer == truth))
    right = sorted(c for c, ok in scored if ok)
    wrong = [c for c, ok in scored if not ok]
    if right and wrong:
        wins = sum(bisect.bisect_left(right, w) + 0.5 * (bisect.bisect_right(right, w) - bisect.bisect_left(right, w))
                   for w in wrong)
        out["scorer_auroc"] = round(1 - wins / (len(right) * len(wrong)), 3)
    return out


async def run(*, problems_n: int, loops: int, seeds: list[int], percentiles: list[float], easy: bool,
              preset: str, speed: float) -> dict[str, Any]:
    models = EASY if easy else MODELS
    problems = gsm8k_test(problems_n)
    arms = ["single-strong", "single-weak"] + [f"routed-p{p:g}" for p in percentiles]
    t0 = time.perf_counter()
    runs = {seed: await run_seed(seed, arms, problems, models, loops, preset, speed) for seed in seeds}
    return {
        "config": {"problems": problems_n, "loops": loops, "seeds": seeds, "percentiles": percentiles,
                   "population": 8, "k": 3, "groups": 8, "lite_fraction": LITE, "fitness": "confidence",
                   "models": "easy" if easy else "hard", "sim_preset": preset, "sim_speed": speed},
        "models": models, "signal": signal(problems, models),
        "arms": summarize(arms, runs),
        "runs": {str(s): {arm: {k: v for k, v in r.items() if k != "correct"} | {"correct": sum(r["correct"])}
                          for arm, r in rs.items()} for s, rs in runs.items()},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def _table(result: dict[str, Any]) -> None:
    c = result["config"]
    print(f"{c['problems']} GSM8K problems x seeds {c['seeds']}, {c['loops']} loops, N=8 K=3 M=8, "
          f"lite {c['lite_fraction']}, {c['models']} models; sim {c['sim_preset']} x{c['sim_speed']}")
    sig = result["signal"]
    print(f"models: strong p(right) {sig['strong']['mean_p_right']}, weak {sig['weak']['mean_p_right']}; "
          f"8-vote majority right: strong {sig['strong']['majority_of_8_right']}, weak "
          f"{sig['weak']['majority_of_8_right']}; scorer AUROC {sig.get('scorer_auroc')}")
    print(f"{'arm':>14} {'accuracy':>9} {'95% CI':>13} {'vs strong':>9} {'cost $':>9} {'ratio':>6} "
          f"{'score $%':>8} {'score t':>7} {'overhd':>6} {'run s':>6}  calls per tier per run")
    for arm, r in result["arms"].items():
        lo, hi = r["accuracy_ci95"]
        diff = r.get("accuracy_minus_single_strong")
        print(f"{arm:>14} {r['accuracy']:>9.3f} {f'{lo:.2f}-{hi:.2f}':>13} "
              f"{'' if diff is None else f'{diff:+.3f}':>9} {r['cost_usd']:>9.4f} "
              f"{r['cost_ratio_vs_single_strong'] or 0:>5.2f}x {100 * r['scoring_cost_share']:>7.2f}% "
              f"{r['scoring_time_ratio']:>7.3f} "
              f"{r['overhead_ratio']:>6.3f} {r['run_wall_s']:>6.2f}  {r['tier_calls_per_run']}")
    print(f"wall {result['wall_s']} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="8 problems, 3 loops, seed 0, percentiles 0 50 100 (< 1 minute)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--problems", type=int, help="how many bundled GSM8K problems (max 200; default 30, quick 8)")
    ap.add_argument("--loops", type=int, help="default 3")
    ap.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2, quick 0")
    ap.add_argument("--percentiles", type=float, nargs="+",
                    help="routing percentiles, one routed arm each (default 0 25 50 75 100, quick 0 50 100)")
    ap.add_argument("--easy", action="store_true", help="the original simulated models (independent errors)")
    ap.add_argument("--preset", default="llama-3.1-8b-h100", help="simulated engine cost model")
    ap.add_argument("--speed", type=float, default=10.0, help="simulated seconds per wall second")
    args = ap.parse_args()
    result = asyncio.run(run(
        problems_n=args.problems or (8 if args.quick else 30), loops=args.loops or 3,
        seeds=args.seeds or ([0] if args.quick else [0, 1, 2]),
        percentiles=args.percentiles or ([0, 50, 100] if args.quick else [0, 25, 50, 75, 100]), easy=args.easy,
        preset=args.preset, speed=args.speed))
    if args.json:
        print(json.dumps(result))
    else:
        _table(result)


if __name__ == "__main__":
    main()

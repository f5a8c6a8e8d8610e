"""Staircase vs wait: time to first token, total time and answer quality of Mixture-of-Agents pipelines.

    .venv/bin/python bench/pipeline.py --quick --json

Every configuration runs both modes, side by side, with the same agents and lengths, through the
project's scheduler runtime (``ProgramRuntime``, one program per agent) and the pipeline executor
the ``pipeline`` workflow uses (without the run store, whose cost is not what is compared here).

Simulator configurations: simulator servers in their own processes, in real time at ``--speed``
(simulated seconds per wall second; the figures are simulated seconds, HTTP and Python overheads
included and scaled by the same factor, so they count against staircase's extra rounds).
Each proposer is its own engine (the paper's proposers are different models); the aggregator is
another. Token rates are those of the cost presets (scheduler/sim/cost.py, sources there):

- ``llama-3.1-8b-h100`` proposers: ~6 ms a decode step (~165 tokens/s a stream), 35 us a prefill token.
- ``llama-3.1-70b-h100-tp4`` aggregator: ~15 ms a decode step (~65 tokens/s), 79 us a prefill token.

Every agent writes a fixed length (simulator traces), so both modes produce as many tokens:

- ``moa-3x8b-70b`` mirrors the paper's setting (3 proposers + 1 aggregator, full-length answers).
- ``moa-2layers``: two layers of 3 proposers, then the aggregator.

Local configuration (``local-smollm2``): the real SmolLM2-135M-Instruct on CPU (LocalEngine, one
process, no batching: the agents share one forward-pass thread), 3 proposers + 1 aggregator.

Quality (``quality``): the real SmolLM2 at temperature 0 answers a fixed set of short questions
with known answers (``QUESTIONS``; 4 of them with ``--quick``), 3 proposers + 1 aggregator,
chunks of 8 tokens, 32 tokens per agent, in three arms: ``wait``, ``staircase`` (continuation
``turn``) and ``staircase_prefix`` (continuation ``prefix``, what the default ``auto`` picks
here: the local engine, like SGLang, honours ``continue_final_message``). Figures: ``accuracy_<arm>`` (the
answer contains a known answer as a whole word), ``agreement`` / ``agreement_prefix`` (the
staircase answer identical to wait's; ``_normalized``: up to whitespace), ``restarted_<arm>``
(answers that start over or repeat themselves verbatim, the defect of issue 19), ``glued_<arm>``
(a capitalized word glued to the text before it: the trace of a reworded restart at a round
boundary), ``<arm>_rounds_mean``, ``wall_s``, and every answer. The paper's target is parity.

Per mode: ``ttft_s`` (pipeline start to the aggregator's first token), ``total_s`` (to its last),
``prefill_tokens`` (prompt tokens the aggregator sent over all its rounds), ``cached_tokens`` and
``cached_share`` (how many of them the engine's prefix cache served), ``rounds``, ``output_tokens``.
Per configuration: ``ttft_reduction`` (1 - staircase / wait) and ``total_ratio`` (staircase / wait).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncGenerator
from contextlib import AsyncExitStack
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402

from agents.pipeline_exec import PipelineExecutor  # noqa: E402
from agents.pipeline_spec import Node, PipelineInput  # noqa: E402
from scheduler.backends.base import Backend, GenerateRequest, GenerationChunk  # noqa: E402
from scheduler.backends.sglang import SGLangBackend  # noqa: E402
from scheduler.runtime import ProgramRuntime  # noqa: E402
from scheduler.session import ProgramSession  # noqa: E402
from tests.servers import free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "Explain how a radix-tree prefix cache lets an LLM server skip recomputing shared prompt prefixes."


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Sims:
    """Simulator servers, one per engine, each answering with a fixed number of tokens."""

    def __init__(self, speed: float) -> None:
        self.speed = speed
        self.procs: list[subprocess.Popen[bytes]] = []
        self.dir = tempfile.mkdtemp(prefix="bench-pipeline-")

    def start(self, name: str, preset: str, tokens: int) -> str:
        trace = os.path.join(self.dir, f"{name}.json")
        with open(trace, "w") as f:
            json.dump({"turns": [{"output_tokens": tokens}]}, f)
        port = free_port()
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "scheduler.sim.server", "--port", str(port), "--preset", preset,
             "--speed", str(self.speed), "--script", trace],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"simulator {name} did not start")

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait(10)


class _NoEvents:
    async def delta(self, round: int, text: str) -> None:
        return None

    async def agent(self, node: str, data: dict[str, Any]) -> None:
        return None

    async def round(self, data: dict[str, Any]) -> None:
        return None


async def run_once(runtime: ProgramRuntime, spec: PipelineInput, tag: str) -> dict[str, Any]:
    """One run as the workflow makes it: a ``ProgramSession`` per agent, released at the end."""
    sessions = {n.id: ProgramSession(runtime, f"{tag}:{n.id}", "bench",
                                     backends=(n.agent.backend,) if n.agent.backend else None)
                for n in spec.nodes()}

    def llm(node: Node, request: GenerateRequest) -> AsyncGenerator[GenerationChunk, None]:
        return sessions[node.id].stream(request)

    async with AsyncExitStack() as programs:
        for session in sessions.values():
            await programs.enter_async_context(session)
        return await PipelineExecutor(spec, llm, _NoEvents()).run()


async def flush(backends: dict[str, Backend]) -> None:
    """Empty every prefix cache, so neither mode profits from the other's run."""
    for b in backends.values():
        if isinstance(b, SGLangBackend):
            await b.flush_cache()
        else:
            b.cache.clear()  # type: ignore[attr-defined]  # the local engine


def summary(results: list[dict[str, Any]], scale: float) -> dict[str, Any]:
    med = lambda k: statistics.median(r[k] for r in results)  # noqa: E731
    agg = results[-1]["aggregator_usage"]
    return {"ttft_s": round(med("ttft_s") * scale, 3), "total_s": round(med("elapsed_s") * scale, 3),
            "rounds": results[-1]["rounds"], "output_tokens": agg["completion_tokens"],
            "prefill_tokens": agg["prompt_tokens"], "cached_tokens": agg["cached_tokens"],
            "cached_share": round(agg["cached_tokens"] / max(1, agg["prompt_tokens"]), 3),
            "all_agents_prefill_tokens": results[-1]["usage"]["prompt_tokens"],
            "all_agents_cached_tokens": results[-1]["usage"]["cached_tokens"],
            "repeats": len(results)}


async def compare(name: str, backends: dict[str, Backend], spec: dict[str, Any], repeats: int,
                  scale: float, setup: dict[str, Any]) -> dict[str, Any]:
    runtime = ProgramRuntime(backends, observe_interval_s=5.0)
    await runtime.start()
    out: dict[str, Any] = {}
    try:
        for mode in ("wait", "staircase"):
            results = []
            for i in range(repeats):
                await flush(backends)
                r = await run_once(runtime, PipelineInput(**{**spec, "mode": mode}), f"{name}-{mode}-{i}")
                if r["stop_reason"] != "finished" and r["stop_reason"] != "max_tokens":
                    raise RuntimeError(f"{name} {mode}: {r['stop_reason']}")
                results.append(r)
            out[mode] = summary(results, scale)
            log(f"{name:>16} {mode:>9}: ttft {out[mode]['ttft_s']:.3f} s, total {out[mode]['total_s']:.3f} s, "
                f"rounds {out[mode]['rounds']}, cached {out[mode]['cached_share']:.0%} of "
                f"{out[mode]['prefill_tokens']} prefill tokens")
    finally:
        await runtime.close()
    w, s = out["wait"], out["staircase"]
    out["ttft_reduction"] = round(1 - s["ttft_s"] / w["ttft_s"], 3)
    out["total_ratio"] = round(s["total_s"] / w["total_s"], 3)
    out["setup"] = setup
    return out


def moa_spec(proposers: list[str], layers: int, proposer_tokens: int, agg_tokens: int,
             schedule: list[int], chunk: int) -> dict[str, Any]:
    layer = {"agents": [{"backend": b} for b in proposers], "max_tokens": proposer_tokens}
    return {"task": TASK, "temperature": 0, "layers": [layer] * layers, "chunk_tokens": chunk,
            "chunk_schedule": schedule, "aggregator": {"backend": "agg", "max_tokens": agg_tokens},
            "delta_interval_s": 0.05, "stall_timeout_s": 120, "time_budget_s": 3600}


async def sim_configs(quick: bool, speed: float) -> dict[str, Any]:
    tokens = [384, 512, 448] if not quick else [256, 320, 288]
    agg_tokens = 512 if not quick else 320
    schedule, chunk = [16, 32], 64
    repeats = 1 if quick else 3
    sims = Sims(speed)
    backends: dict[str, Backend] = {}
    try:
        for i, n in enumerate(tokens):
            backends[f"p{i}"] = SGLangBackend(sims.start(f"p{i}", "llama-3.1-8b-h100", n), name=f"p{i}")
        backends["agg"] = SGLangBackend(sims.start("agg", "llama-3.1-70b-h100-tp4", agg_tokens), name="agg")
        setup = {"engine": "simulator", "speed": speed, "proposers": "llama-3.1-8b-h100 x3 (own engines)",
                 "aggregator": "llama-3.1-70b-h100-tp4", "proposer_tokens": tokens, "aggregator_tokens": agg_tokens,
                 "chunk_schedule": schedule, "chunk_tokens": chunk}
        out = {}
        names = list(backends)[:-1]
        out["moa-3x8b-70b"] = await compare("moa-3x8b-70b", backends, moa_spec(names, 1, max(tokens), agg_tokens,
                                                                               schedule, chunk), repeats, speed, setup)
        out["moa-2layers"] = await compare("moa-2layers", backends, moa_spec(names, 2, max(tokens), agg_tokens,
                                                                             schedule, chunk), repeats, speed,
                                           {**setup, "layers": 2})
        return out
    finally:
        for b in backends.values():
            await b.close()
        sims.stop()


async def local_config(quick: bool) -> dict[str, Any]:
    from scheduler.local.engine import LocalEngine

    engine = LocalEngine(name="local")
    tokens, chunk = (12, 4) if quick else (64, 8)
    spec = {"task": "Name three uses of a hash map, briefly.", "temperature": 0, "chunk_tokens": chunk,
            "layers": [{"agents": [], "max_tokens": tokens}], "aggregator": {"max_tokens": tokens},
            "delta_interval_s": 0.05, "stall_timeout_s": 300, "time_budget_s": 1800}
    # three different proposers from one model: different system prompts
    spec["layers"][0]["agents"] = [{"system_prompt": p} for p in (
        "You are a concise engineer.", "You are a teacher who gives examples.", "You answer in a numbered list.")]
    try:
        return await compare("local-smollm2", {"local": engine}, spec, 1, 1.0, {
            "engine": "local SmolLM2-135M-Instruct on CPU (one forward pass at a time)", "max_tokens": tokens,
            "chunk_tokens": chunk})
    finally:
        await engine.close()


# Short questions with one known answer (any of the aliases, as a whole word, counts), easy enough
# for SmolLM2-135M to get some right: a fixed task set for the quality comparison.
QUESTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of Italy?", ("Rome",)),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ("How many days are in a week?", ("7", "seven")),
    ("How many legs does a spider have?", ("8", "eight")),
    ("What is the chemical symbol for gold?", ("Au",)),
    ("What language is spoken in Brazil?", ("Portuguese",)),
    ("What gas do plants absorb from the air for photosynthesis?", ("carbon dioxide", "CO2")),
    ("What is the boiling point of water at sea level in degrees Celsius?", ("100",)),
]
QUICK_QUESTIONS = 4


def correct(answer: str, aliases: tuple[str, ...]) -> bool:
    return any(re.search(rf"\b{re.escape(a)}\b", answer, re.IGNORECASE) for a in aliases)


def restarted(answer: str, span: int = 24, opening: int = 16) -> bool:
    """Whether an answer starts over or says something twice: its first ``opening`` characters
    (whitespace collapsed) occur again later, or any stretch of ``span`` characters does (not
    overlapping itself). The staircase defect of issue 19 wrote "The capital of France is
    Paris.The capital of France is Paris."; a sound short answer does neither."""
    text = " ".join(answer.split())
    if len(text) >= 2 * opening and text.find(text[:opening], opening) >= 0:
        return True
    return any(text.find(text[i:i + span], i + span) >= 0 for i in range(len(text) - 2 * span + 1))


GLUED = re.compile(r"(?:[a-z.!?]|(?<=\S)[\"')])[A-Z][a-z]")


def glued(answer: str) -> bool:
    """Whether a capitalized word is glued to the text before it ("...sea levelAt sea level, the
    boiling point"): what a round that begins a new answer, reworded, leaves at a round boundary,
    which ``restarted`` does not see. A rough signal (it also matches names like "McDonald")."""
    return GLUED.search(answer) is not None


# the arms of the quality comparison: name -> what it sets on the pipeline
ARMS: dict[str, dict[str, Any]] = {"wait": {"mode": "wait"}, "staircase": {"mode": "staircase", "continuation": "turn"},
                                   "staircase_prefix": {"mode": "staircase", "continuation": "prefix"}}


async def quality_config(quick: bool) -> dict[str, Any]:
    """Staircase vs wait on the same questions with the real SmolLM2 (temperature 0): how often
    the answers are identical, how often each contains the known answer, and how often an answer
    starts over; staircase with each continuation (``turn`` and ``prefix``, which ``auto``, the
    default, picks on SGLang and the local engine). The
    paper's claim is quality parity; this measures it on a model small enough for this CPU."""
    from scheduler.local.engine import LocalEngine

    engine = LocalEngine(name="local")
    questions = QUESTIONS[:QUICK_QUESTIONS] if quick else QUESTIONS
    spec = {"temperature": 0, "chunk_tokens": 8, "layers": [{"agents": [{"system_prompt": p} for p in (
        "You are a concise expert.", "You explain briefly.", "You answer in one sentence.")], "max_tokens": 32}],
        "aggregator": {"max_tokens": 32}, "delta_interval_s": 0.05, "stall_timeout_s": 300, "time_budget_s": 1800}
    runtime = ProgramRuntime({"local": engine}, observe_interval_s=5.0)
    await runtime.start()
    rows = []
    started = time.monotonic()
    try:
        for qi, (question, _aliases) in enumerate(questions):
            row: dict[str, Any] = {"question": question}
            for arm, settings in ARMS.items():
                engine.cache.clear()
                r = await run_once(runtime, PipelineInput(**{**spec, "task": question, **settings}),
                                   f"quality-{qi}-{arm}")
                row[arm] = r["answer"]
                row[f"{arm}_rounds"] = r["rounds"]
            rows.append(row)
            log(f"{'quality':>16} {qi:>2}: " + " | ".join(f"{arm} {row[arm]!r}" for arm in ARMS))
    finally:
        await runtime.close()
        await engine.close()
    n = len(rows)
    share = lambda f: round(sum(1 for r in rows if f(r)) / n, 3)  # noqa: E731
    by_q = dict(questions)
    out: dict[str, Any] = {"questions": n}
    for arm in ARMS:
        out[f"accuracy_{arm}"] = share(lambda r: correct(r[arm], by_q[r["question"]]))  # noqa: B023
    for arm, suffix in (("staircase", ""), ("staircase_prefix", "_prefix")):
        out[f"agreement{suffix}"] = share(lambda r: r["wait"] == r[arm])  # noqa: B023
        out[f"agreement{suffix}_normalized"] = share(
            lambda r: " ".join(r["wait"].split()) == " ".join(r[arm].split()))  # noqa: B023
    for arm in ARMS:
        out[f"restarted_{arm}"] = share(lambda r: restarted(r[arm]))  # noqa: B023
        out[f"glued_{arm}"] = share(lambda r: glued(r[arm]))  # noqa: B023
    for arm in ("staircase", "staircase_prefix"):
        out[f"{arm}_rounds_mean"] = round(statistics.mean(r[f"{arm}_rounds"] for r in rows), 2)
    out.update({"wall_s": round(time.monotonic() - started, 1),
                "setup": {"engine": "local SmolLM2-135M-Instruct on CPU", "temperature": 0, "proposers": 3,
                          "max_tokens": 32, "chunk_tokens": 8},
                "answers": rows})
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not args.quality_only:
        out.update(await sim_configs(args.quick, args.speed))
        if not args.no_local:
            out["local-smollm2"] = await local_config(args.quick)
    if not args.no_quality:
        out["quality"] = await quality_config(args.quick)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter answers, one repeat, 4 quality questions "
                                                         "(2-4 minutes on 2 shared cores, most of it the real model)")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--speed", type=float, help="simulated seconds per wall second (default: 2 with --quick, "
                                                "else 1; higher speeds scale this process's overheads up too)")
    ap.add_argument("--no-local", action="store_true", help="skip the local-engine configuration")
    ap.add_argument("--no-quality", action="store_true", help="skip the quality comparison (real SmolLM2)")
    ap.add_argument("--quality-only", action="store_true", help="only the quality comparison")
    args = ap.parse_args()
    args.speed = args.speed or (2.0 if args.quick else 1.0)
    out = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(out))
    else:
        quality = out.pop("quality", None)
        for name, r in out.items():
            print(f"{name}: ttft {r['wait']['ttft_s']} -> {r['staircase']['ttft_s']} s "
                  f"(-{r['ttft_reduction']:.0%}), total {r['wait']['total_s']} -> {r['staircase']['total_s']} s "
                  f"(x{r['total_ratio']}), cached {r['staircase']['cached_share']:.0%} of staircase prefill")
        if quality:
            q = quality
            print(f"quality ({q['questions']} questions): accuracy wait {q['accuracy_wait']:.0%}, staircase "
                  f"{q['accuracy_staircase']:.0%} (prefix {q['accuracy_staircase_prefix']:.0%}); identical to wait "
                  f"{q['agreement']:.0%} (prefix {q['agreement_prefix']:.0%}); restarted or glued: staircase "
                  f"{q['restarted_staircase']:.0%}/{q['glued_staircase']:.0%}, prefix "
                  f"{q['restarted_staircase_prefix']:.0%}/{q['glued_staircase_prefix']:.0%}")


if __name__ == "__main__":
    main()

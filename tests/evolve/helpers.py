"""Shared pieces of the evolve tests: scripted simulator models and the rules, restated."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx

from tests.servers import SimServerProcess

Q = "A farmer has 3 pens with 4 sheep each and buys 5 more sheep. How many sheep does he have?"
TRUTH = "17"


def sim_model(tmp_path: Path, name: str, accuracy: float, seed: int, *args: str, **script: object) -> SimServerProcess:
    """A simulator server whose model answers ``Q`` right with probability ``accuracy``."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"kind": "problems", "accuracy": accuracy, "seed": seed,
                                "problems": [{"question": Q, "answer": TRUTH}], **script}))
    return SimServerProcess(*(args or ("--speed", "200")), "--script", str(path), "--served-model-name", name).start()


def sim_metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"sglang:{name}{{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}")


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def expected_tiers(fitness: list[float], percentiles: list[float], lite_fraction: float) -> list[str]:
    """The reference implementation's rule (``compute_thresholds`` / ``assign_routes`` of
    squeeze-evolve), written out independently: 'm<i>' for model i (0 = most expensive), 'lite'.
    Percentiles sorted, 100 -> max + 1, 0 -> min - 1; a group goes to the first threshold it is at
    or below; then max(1, floor(fraction * n)) of the cheapest model's n groups go lite."""
    thresholds = []
    for q in sorted(percentiles):
        thresholds.append(max(fitness) + 1 if q >= 100 else min(fitness) - 1 if q <= 0 else percentile(fitness, q))
    cheapest = len(percentiles)
    tiers = [next((i for i, t in enumerate(thresholds) if f <= t), cheapest) for f in fitness]
    members = sorted((g for g, t in enumerate(tiers) if t == cheapest), key=lambda g: (-fitness[g], g))
    n_lite = max(1, int(lite_fraction * len(members) + 1e-9)) if lite_fraction > 0 and members else 0
    lite = set(members[:n_lite])
    return ["lite" if g in lite else f"m{t}" for g, t in enumerate(tiers)]

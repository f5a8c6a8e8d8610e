"""Bundled problem sets with ground truth.

``gsm8k_test_200.jsonl``: the first 200 problems of GSM8K's test split (github.com/openai/
grade-school-math, MIT licence, text in ``LICENSE-gsm8k``), as ``{"id", "question", "answer"}``
with the integer after ``####`` as the answer.
"""

from __future__ import annotations

import json
from importlib import resources


def gsm8k_test(limit: int | None = None) -> list[dict[str, str]]:
    text = resources.files(__name__).joinpath("gsm8k_test_200.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return rows[:limit] if limit is not None else rows

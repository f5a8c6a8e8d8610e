"""Answer extraction: the final answer a candidate states, as a normalised string.

Voting (diversity fitness, the lite tier's majority, the final majority) compares answers, not
texts, so two candidates that reach 18 by different reasoning agree. Extractors are plain
functions ``text -> str | None`` looked up by name; ``None`` means the candidate stated no
answer the extractor recognises.
"""

from __future__ import annotations

import re
from collections.abc import Callable

Extractor = Callable[[str], "str | None"]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_CHOICE = re.compile(r"(?:answer|choice|option)\s*(?:is|:)?\s*\(?([A-J])\)?(?![A-Za-z])", re.IGNORECASE)
_LONE_CHOICE = re.compile(r"(?<![A-Za-z])\(?([A-J])\)?(?![A-Za-z])")


def _boxed_contents(text: str) -> list[str]:
    """Every ``\\boxed{...}``'s contents, braces balanced (``\\boxed{\\frac{1}{2}}`` works)."""
    out = []
    start = 0
    while (i := text.find("\\boxed{", start)) >= 0:
        depth, j = 1, i + len("\\boxed{")
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0:
            out.append(text[i + len("\\boxed{"): j - 1].strip())
        start = j
    return out


def normalize_number(s: str) -> str | None:
    """``"1,234.50"`` -> ``"1234.5"``, ``"18.0"`` -> ``"18"``; not a number -> None."""
    m = _NUMBER.search(s.replace("$", ""))
    if m is None:
        return None
    raw = m.group(0).replace(",", "")
    if "." in raw:
        raw = raw.rstrip("0").rstrip(".")
    return "0" if raw in ("-0", "") else raw


def boxed(text: str) -> str | None:
    """The last non-empty ``\\boxed{...}``; numbers normalised, other contents whitespace-trimmed."""
    found = [b for b in _boxed_contents(text) if b]
    if not found:
        return None
    last = found[-1]
    number = normalize_number(last)
    return number if number is not None and _NUMBER.fullmatch(last.replace(",", "").replace("$", "").strip()) else last


def integer(text: str) -> str | None:
    """A number answer: a ``\\boxed{}``, else after ``####`` (GSM8K), else after "answer is",
    else the last number in the text."""
    b = boxed(text)
    if b is not None and (n := normalize_number(b)) is not None:
        return n
    for marker in ("####", "answer is", "Answer:"):
        i = text.rfind(marker)
        if i >= 0 and (n := normalize_number(text[i + len(marker):])) is not None:
            return n
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def choice(text: str) -> str | None:
    """A multiple-choice letter A-J: ``\\boxed{C}``, "the answer is (C)", else a lone last letter."""
    b = boxed(text)
    if b is not None and (m := _LONE_CHOICE.fullmatch(b.strip().upper())):
        return m.group(1).upper()
    hits = _CHOICE.findall(text)
    if hits:
        return hits[-1].upper()
    lone = _LONE_CHOICE.findall(text[-40:])
    return lone[-1].upper() if lone else None


BUILTIN_EXTRACTORS: dict[str, Extractor] = {"integer": integer, "boxed": boxed, "choice": choice}

ANSWER_INSTRUCTIONS = {
    "integer": "Put the final answer, a number, in \\boxed{}.",
    "boxed": "Put the final answer in \\boxed{}.",
    "choice": "Put the letter of the correct option in \\boxed{}.",
}

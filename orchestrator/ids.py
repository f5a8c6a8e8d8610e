"""Sortable identifiers: a millisecond timestamp then randomness, so ``id`` order is creation order."""

from __future__ import annotations

import os
import re
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case


def _b32(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    ms = int(time.time() * 1000)
    rand = int.from_bytes(os.urandom(10), "big")
    return f"{prefix}_{_b32(ms, 10)}{_b32(rand, 16)}"


def id_pattern(prefix: str) -> str:
    """The regular expression of ids with ``prefix`` (also their OpenAPI ``pattern``)."""
    return rf"^{prefix}_[{_ALPHABET}]{{26}}$"


def is_valid_id(prefix: str, value: str) -> bool:
    return re.fullmatch(id_pattern(prefix), value) is not None

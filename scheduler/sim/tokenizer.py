"""A deterministic stand-in tokenizer and chat template for the simulator.

Pieces, in order of preference: a special token ``<|...|>``; an optional single space followed
by 1-4 letters/digits; an optional single space followed by one other symbol; one whitespace
character. English prose comes out near 4 characters per token, like BPE tokenizers. The point
of this shape is that appending text to a string only changes the last token or so, so an agent
prompt that grows turn by turn shares its token prefix with the previous turn, as it does with a
real tokenizer, and the radix cache sees realistic hits. Ids are stable hashes of the piece
(no vocabulary file); ``decode`` knows every piece this instance has produced or encoded.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

_PIECE = re.compile(r"<\|[a-z_]+\|>| ?[A-Za-z0-9]{1,4}| ?[^\sA-Za-z0-9]|\s")
VOCAB = 1 << 31


class SimTokenizer:
    def __init__(self) -> None:
        self._pieces: dict[int, str] = {}
        self._ids: dict[str, int] = {}

    def piece_id(self, piece: str) -> int:
        token = self._ids.get(piece)
        if token is None:
            token = int.from_bytes(hashlib.blake2b(piece.encode(), digest_size=4).digest(), "big") % VOCAB
            self._ids[piece] = token
            self._pieces[token] = piece
        return token

    def split(self, text: str) -> list[str]:
        return _PIECE.findall(text)

    def encode(self, text: str) -> list[int]:
        return [self.piece_id(p) for p in self.split(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self._pieces.get(i, "") for i in ids)


def render_chat(messages: Sequence[dict[str, Any]]) -> str:
    """ChatML, ending with the assistant generation prompt (what SmolLM2/Qwen templates do).

    Tool calls of earlier assistant turns are rendered as their JSON so the next prompt
    contains what the model produced."""
    parts = []
    for m in messages:
        content = m.get("content") or ""
        if isinstance(content, list):  # OpenAI content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        for call in m.get("tool_calls") or []:
            fn = call.get("function", {})
            name, arguments = fn.get("name", ""), fn.get("arguments", "{}")
            content += f'<tool_call>{{"name": "{name}", "arguments": {arguments}}}</tool_call>'
        parts.append(f"<|im_start|>{m.get('role', 'user')}\n{content}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)

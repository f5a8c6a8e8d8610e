"""Grammar-constrained tool calls for the local engine.

A 135M model asked to write ``{"name": ..., "arguments": {...}}`` by itself writes broken
JSON, names tools that do not exist and forgets required arguments. SGLang avoids this with
constrained decoding (``tool_choice`` ``required`` or a named function compiles the tools'
JSON schemas into a grammar; ``auto`` uses a *structural tag* that constrains only what
follows the call's opening tag). The local engine does the same with llguidance, one of
SGLang's grammar backends: before each token is sampled, every token that cannot continue a
valid call is masked out, and tokens the grammar forces (the tags, ``"name": "``, a key) are
taken without sampling, several per forward pass.

What the grammar guarantees: a call names one of the request's tools and its arguments are a
JSON object that validates against that tool's ``parameters`` schema, except where
generation is cut by ``max_tokens`` first. The arguments' *values* are still the model's.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch
from llguidance import LLMatcher, LLTokenizer, StructTag
from llguidance.hf import from_tokenizer

from scheduler.local.tool_calls import CLOSE, OPEN

log = logging.getLogger(__name__)

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    return tool.get("function", tool)


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    params = _function(tool).get("parameters")
    return params if isinstance(params, dict) and params else _ANY_OBJECT


def _call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": _function(tool)["name"]},
                                             "arguments": _parameters(tool)},
            "required": ["name", "arguments"], "additionalProperties": False}


def chosen_tools(tool_choice: Any, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tools a call may name: all of them, or the one ``tool_choice`` names."""
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        picked = [t for t in tools if _function(t).get("name") == name]
        if not picked:
            raise ValueError(f"tool_choice names {name!r}, which is not among the request's tools")
        return picked
    return tools


def tool_call_grammar(tool_choice: Any, tools: list[dict[str, Any]]) -> str | None:
    """A Lark grammar (llguidance dialect) for the assistant turn, or None for no constraint.

    ``required`` / a named function: the turn is exactly one call. ``auto``: free text in which
    every ``<tool_call>`` opens a call that must be valid (a structural tag). ``none``: free."""
    if not tools or tool_choice == "none":
        return None
    if tool_choice == "required" or isinstance(tool_choice, dict):
        picked = chosen_tools(tool_choice, tools)
        schema = _call_schema(picked[0]) if len(picked) == 1 else {"anyOf": [_call_schema(t) for t in picked]}
        opening, closing = json.dumps(OPEN + "\n"), json.dumps("\n" + CLOSE)
        return f"start: {opening} call {closing}\ncall: %json {json.dumps(schema)}"
    tags = [StructTag(trigger=OPEN, begin=f'{OPEN}\n{{"name": {json.dumps(_function(t)["name"])}, "arguments": ',
                      grammar=_parameters(t), end=f"}}\n{CLOSE}") for t in tools]
    return StructTag.to_grammar(tags, assume_special=False)


class Constraint:
    """One generation's grammar state: which tokens may come next, and which are forced."""

    def __init__(self, tokenizer: LLTokenizer, grammar: str, vocab_size: int) -> None:
        self._matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise ValueError(f"the tools' schemas do not compile to a grammar: {self._matcher.get_error()}")
        self._vocab = vocab_size

    def mask(self) -> torch.Tensor:
        """A bool tensor over the vocabulary: True where the token may come next."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        return torch.from_numpy(np.unpackbits(bits, bitorder="little")[: self._vocab].astype(bool))

    def consume(self, token: int) -> list[int]:
        """Take the sampled token; return the tokens the grammar now forces (taken too)."""
        self._matcher.consume_token(token)
        forced = self._matcher.compute_ff_tokens() if not self.done else []
        if forced:
            self._matcher.consume_tokens(forced)
        return forced

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of ``tokens`` the grammar would accept from here (nothing is consumed)."""
        return self._matcher.validate_tokens(tokens)

    @property
    def done(self) -> bool:
        """The grammar is complete (a required call closed) or broken: generation stops."""
        return self._matcher.is_stopped() or self._matcher.is_error()


class GrammarCompiler:
    """Builds ``Constraint`` s for one tokenizer. The llguidance view of the tokenizer takes a
    second or two to build, so it is made once, on first use."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int) -> None:
        self._hf = hf_tokenizer
        self._vocab = vocab_size
        self._tokenizer: LLTokenizer | None = None

    def constraint(self, tool_choice: Any, tools: list[dict[str, Any]] | None) -> Constraint | None:
        grammar = tool_call_grammar(tool_choice, tools or [])
        if grammar is None:
            return None
        if self._tokenizer is None:
            self._tokenizer = from_tokenizer(self._hf, n_vocab=self._vocab)
        return Constraint(self._tokenizer, grammar, self._vocab)

"""Chat templates for prompts we send as raw text (confidence scoring, ``completions`` models).

A prefill-only scoring pass needs the prompt logprobs of the exact text the model would have
seen in a chat, so the chat template is rendered here: with the in-process engine's own
tokenizer when there is one, as ChatML (SmolLM2, Qwen and most SGLang-served chat models), or
with a Jinja template given in the model's spec.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

_JINJA = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)


def chatml(messages: Sequence[dict[str, Any]]) -> str:
    body = "".join(f"<|im_start|>{m.get('role', 'user')}\n{m.get('content') or ''}<|im_end|>\n" for m in messages)
    return body + "<|im_start|>assistant\n"


def check_template(template: str) -> None:
    """Raises ``ValueError`` if ``template`` is neither a known name nor valid Jinja."""
    if template in ("auto", "chatml"):
        return
    try:
        _JINJA.from_string(template)
    except TemplateError as exc:
        raise ValueError(f"chat_template is not a valid Jinja template: {exc}") from None


def render(template: str, messages: Sequence[dict[str, Any]], backend: Any = None) -> str:
    if template == "auto":
        tokenizer = getattr(backend, "tokenizer", None)
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return str(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False))
        return chatml(messages)
    if template == "chatml":
        return chatml(messages)
    return _JINJA.from_string(template).render(messages=list(messages), add_generation_prompt=True,
                                               bos_token="", eos_token="")

"""Tool calls for models that have no native tool calling: tools described in the system
prompt, calls parsed from the reply's text.

The format is the Hermes one (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``)
that many open models were trained on and that SGLang's ``hermes`` parser reads; a fenced
JSON block with ``name`` and ``arguments`` is accepted too, since small models often write one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_FENCED = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.S)


@dataclass(frozen=True)
class TextCall:
    name: str
    arguments: str  # JSON text, possibly malformed: the registry reports that to the model


def tools_prompt(specs: list[dict[str, Any]]) -> str:
    """The paragraph appended to the system prompt in text mode."""
    lines = ["You can call these tools. To call one, reply with exactly one block:",
             '<tool_call>{"name": "<tool name>", "arguments": {<arguments as JSON>}}</tool_call>',
             "and nothing after it. The result comes back in the next message. Tools:"]
    for s in specs:
        f = s["function"]
        lines.append(f"- {f['name']}: {f['description']} Arguments (JSON schema): "
                     f"{json.dumps(f['parameters'], separators=(',', ':'))}")
    return "\n".join(lines)


def parse_text_calls(text: str) -> list[TextCall]:
    """Calls written in the text: tagged blocks first, else fenced JSON with a ``name``."""
    bodies = _TAGGED.findall(text)
    tagged = bool(bodies)
    if not tagged:
        bodies = _FENCED.findall(text)
    calls = []
    for body in bodies:
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            if tagged:  # clearly meant as a call: let the registry tell the model what is wrong
                name = re.search(r'"name"\s*:\s*"([^"]+)"', body)
                calls.append(TextCall(name.group(1) if name else "", body))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        calls.append(TextCall(obj["name"], args if isinstance(args, str) else json.dumps(args)))
    return calls

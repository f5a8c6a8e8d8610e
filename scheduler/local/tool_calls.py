"""Tool calls for a model without native function-calling support in its chat template.

SGLang does this with a *tool-call parser* chosen at launch (``--tool-call-parser``):
the tools are rendered into the prompt, the model writes calls in a known text
format, and the server turns that text into OpenAI ``tool_calls``. The local engine
does the same with the Hermes/Qwen format, which SmolLM2's instruction data used::

    <tool_call>
    {"name": "read_file", "arguments": {"path": "a.txt"}}
    </tool_call>

The engine constrains what the model writes inside a call with a grammar built from
the tools' schemas (``scheduler/local/grammar.py``), so a block is normally valid JSON.
Parsing stays lenient for what a grammar cannot prevent (a call cut by ``max_tokens``): a
block whose name can be read becomes a call with the raw argument text (the agent loop
reports the bad JSON back to the model); a block with no readable name stays text.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from scheduler.backends.base import ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r'"name"\s*:\s*"([^"]+)"')
_ARGS = re.compile(r'"arguments"\s*:\s*', re.S)


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """OpenAI chat messages as plain ``{role, content}`` text for a simple ChatML template:
    content parts joined, assistant tool calls written in the text format above, tool
    results wrapped in ``<tool_response>``."""
    out: list[dict[str, str]] = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        text = content or ""
        if m.get("role") == "assistant" and m.get("tool_calls"):
            blocks = []
            for tc in m["tool_calls"]:
                fn = tc.get("function") or {}
                args = fn.get("arguments") or "{}"
                try:
                    args_obj: Any = json.loads(args) if isinstance(args, str) else args
                except json.JSONDecodeError:
                    args_obj = args
                blocks.append(f"{OPEN}\n{json.dumps({'name': fn.get('name', ''), 'arguments': args_obj})}\n{CLOSE}")
            text = (text + "\n" if text else "") + "\n".join(blocks)
        if m.get("role") == "tool":
            text = f"<tool_response>\n{text}\n</tool_response>"
        out.append({"role": str(m.get("role", "user")), "content": text})
    return out


def tools_prompt(tools: list[dict[str, Any]]) -> str:
    specs = "\n".join(json.dumps(t.get("function", t)) for t in tools)
    return ("You may call one or more functions to help with the user's request. The functions:\n"
            f"<tools>\n{specs}\n</tools>\n"
            "To call a function, reply with a JSON object with its name and arguments inside tags:\n"
            f'{OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CLOSE}')


def with_tools(messages: list[dict[str, str]], tools: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The tool list goes into the system message (added when there is none)."""
    block = tools_prompt(tools)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + block}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def _call(block: str) -> ToolCall | None:
    block = block.strip()
    name: str | None = None
    args: str | None = None
    try:
        obj = json.loads(block)
        if isinstance(obj, list) and obj:
            obj = obj[0]
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            name = obj["name"]
            a = obj.get("arguments", obj.get("parameters", {}))
            args = a if isinstance(a, str) else json.dumps(a)
    except json.JSONDecodeError:
        m = _NAME.search(block)
        if m:
            name = m.group(1)
            a = _ARGS.search(block)
            args = block[a.end():].rstrip().removesuffix("}").rstrip() if a else ""
    if not name:
        return None
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=name, arguments=args or "{}")


class ToolCallParser:
    """Feed generated text; get back the text that is plain content. Text from the first
    ``<tool_call>`` on is held back and turned into calls by ``finish``."""

    def __init__(self) -> None:
        self._buf = ""
        self._emitted = 0  # chars of _buf already returned as content
        self._in_call = False

    def feed(self, text: str) -> str:
        self._buf += text
        if self._in_call:
            return ""
        at = self._buf.find(OPEN, self._emitted)
        if at >= 0:
            self._in_call = True
            out, self._emitted = self._buf[self._emitted:at], at
            return out
        # hold back a tail that could be the start of "<tool_call>"
        safe = len(self._buf)
        for k in range(min(len(OPEN) - 1, len(self._buf) - self._emitted), 0, -1):
            if OPEN.startswith(self._buf[-k:]):
                safe = len(self._buf) - k
                break
        out, self._emitted = self._buf[self._emitted:safe], safe
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content still held back, calls). A block without a close tag (cut by max_tokens) is
        still parsed; one that is not a call is returned as content."""
        rest = self._buf[self._emitted:]
        if not self._in_call:
            self._emitted = len(self._buf)
            return rest, []
        calls: list[ToolCall] = []
        leftover = ""
        for part in rest.split(OPEN)[1:]:
            call = _call(part.partition(CLOSE)[0])
            if call is None:
                leftover += OPEN + part
            else:
                calls.append(call)
        self._emitted = len(self._buf)
        # text around parsed calls is dropped, as SGLang's parsers do; unparsable blocks stay text
        return ("" if calls else leftover), calls

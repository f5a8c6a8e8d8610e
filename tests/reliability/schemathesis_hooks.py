"""Schemathesis hooks for ``test_schema.py``: the validity rules JSON Schema cannot state.

The served document states every rule a JSON Schema can (each workflow's input, message roles,
tool-call shapes, id patterns, the ``max_tokens`` ceiling). Two kinds of rule span several
fields and are enforced by the service but cannot be written there:

- a workflow input's cross-field rules, raised by its model's validators (evolve: ``k`` at most
  the population, one percentile per model boundary, ...);
- a tool message answers a call made by an earlier assistant message.

A request the fuzzer calls valid (positive mode) that breaks one of them is not generated: the
service rightly refuses it, and the positive-data check would call that a bug. Negative cases
are left alone, and a model that refuses an input for any other reason (a type, a bound) is
still reported: that would be the document and the model disagreeing.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from pydantic import ValidationError

from orchestrator.workflows import default_registry

REGISTRY = default_registry()


@schemathesis.hook
def filter_case(context: schemathesis.HookContext, case: schemathesis.Case) -> bool:
    if case.meta is None or not case.meta.generation.mode.is_positive or not isinstance(case.body, dict):
        return True
    if (case.method, case.path) == ("POST", "/v1/runs"):
        return not _breaks_cross_field_rule(case.body)
    if (case.method, case.path) == ("POST", "/v1/batches"):  # each request is a run's input
        workflow = case.body.get("workflow", "agent")
        requests = case.body.get("requests")
        return not any(_breaks_cross_field_rule({"workflow": workflow, "input": item})
                       for item in (requests if isinstance(requests, list) else []))
    if (case.method, case.path) == ("POST", "/v1/chat/completions"):
        return _tool_messages_answer_calls(case.body.get("messages"))
    return True


def _breaks_cross_field_rule(body: dict[str, Any]) -> bool:
    """Its workflow's model refuses the input, only by its own validators (``value_error``)."""
    defn = REGISTRY.get(body.get("workflow"))  # type: ignore[arg-type]
    if defn is None:
        return False
    try:
        defn.input_model.model_validate(body.get("input"))
    except ValidationError as exc:
        return all(error["type"] == "value_error" for error in exc.errors())
    return False


def _tool_messages_answer_calls(messages: Any) -> bool:
    """Every tool message's ``tool_call_id`` is the id of a call of an earlier assistant message."""
    calls: set[Any] = set()
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            continue
        if message.get("role") == "assistant":
            calls |= {call.get("id") for call in message.get("tool_calls") or [] if isinstance(call, dict)}
        elif message.get("role") == "tool" and message.get("tool_call_id") not in calls:
            return False
    return True

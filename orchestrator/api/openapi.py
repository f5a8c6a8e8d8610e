"""The served OpenAPI document: FastAPI's, completed with what it cannot see.

A client (or a fuzzer: ``tests/reliability/test_schema.py`` runs schemathesis against it)
should be able to trust it both ways: a request it calls valid is accepted, and every answer
matches it. FastAPI's document misses the workflows' inputs (``RunCreate.input`` is free-form
in the model, but each workflow validates its own), the API keys, the plain ASGI routes and the
configured ``max_tokens`` ceiling; they are added here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from orchestrator.api.fast import FastRoute, document
from orchestrator.workflows import WorkflowRegistry

SECURITY_SCHEMES = {
    "BearerAuth": {"type": "http", "scheme": "bearer", "description": "An API key (`ORCH_API_KEYS`)."},
    "ApiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "The same key."},
}


def install(app: FastAPI, registry: WorkflowRegistry, fast_routes: list[FastRoute], fast_models: list[Any],
            max_tokens: int, queues: list[str]) -> None:
    """Replace ``app.openapi`` by FastAPI's document completed as the module says (built once)."""
    base: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if not app.openapi_schema:
            schema = base()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            names = {defn.name: add_component(components, defn.input_model, f"{defn.name}-input")
                     for defn in registry}
            schema["x-workflow-inputs"] = names
            run_create = components["RunCreate"]
            run_create["properties"]["queue"]["enum"] = ["default", *queues]  # another name: 422 unknown_queue
            components["RunCreate"] = _run_create_per_workflow(run_create, names)
            for model in fast_models:
                add_component(components, model, model.__name__)
            _cap_max_tokens(components["ChatCompletionRequest"], max_tokens)
            document(schema, fast_routes)
            _require_api_keys(schema)
            _absent_means_none(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def add_component(components: dict[str, Any], model: Any, fallback: str) -> str:
    """Put a pydantic model's JSON schema (and the models it refers to) in the OpenAPI
    components; returns its name there (its title, else ``fallback``)."""
    js = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for def_name, sub in js.pop("$defs", {}).items():
        components.setdefault(def_name, sub)
    name = js.get("title") or fallback
    components.setdefault(name, js)
    return name


def _run_create_per_workflow(run_create: dict[str, Any], inputs: dict[str, str]) -> dict[str, Any]:
    """``RunCreate`` as one variant per workflow whose ``input`` is that workflow's input model:
    with ``input`` free-form, the document called valid any input of any workflow name, which
    the service refuses (``unknown_workflow``, ``invalid_input``)."""
    props = run_create["properties"]
    variants = [{
        "type": "object", "title": f"RunCreate ({workflow})", "additionalProperties": False,
        "required": ["workflow", "input"],
        "properties": {**props, "workflow": {"const": workflow, "description": props["workflow"]["description"]},
                       "input": {"$ref": f"#/components/schemas/{name}"}},
    } for workflow, name in inputs.items()]
    return {"title": "RunCreate", "description": "A run of one registered workflow, with that workflow's input.",
            "oneOf": variants}


def _cap_max_tokens(chat: dict[str, Any], ceiling: int) -> None:
    """The configured ceiling as the ``maximum`` of ``max_tokens`` / ``max_completion_tokens``."""
    for field in ("max_tokens", "max_completion_tokens"):
        for branch in chat["properties"][field]["anyOf"]:
            if branch.get("type") == "integer":
                branch["maximum"] = ceiling


def _absent_means_none(schema: dict[str, Any]) -> None:
    """An optional parameter is left out to mean "none". FastAPI documents ``X | None`` as
    ``anyOf: [X, null]``, and a client then sends the text ``null`` (``?after=null``), which is
    no run id."""
    for operations in schema["paths"].values():
        for operation in operations.values():
            for param in operation.get("parameters", []):
                js = param["schema"]
                kept = [branch for branch in js.get("anyOf", []) if branch.get("type") != "null"]
                if not param.get("required") and len(kept) == 1 < len(js["anyOf"]):
                    param["schema"] = {**kept[0], **{k: v for k, v in js.items() if k != "anyOf"}}


def _require_api_keys(schema: dict[str, Any]) -> None:
    """Every ``/v1`` operation takes an API key, as a bearer token or in ``X-API-Key``."""
    schema["components"]["securitySchemes"] = SECURITY_SCHEMES
    for path, operations in schema["paths"].items():
        if path.startswith("/v1/"):
            for operation in operations.values():
                operation["security"] = [{name: []} for name in SECURITY_SCHEMES]

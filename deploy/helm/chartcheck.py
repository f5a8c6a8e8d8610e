"""Lint, render and validate the chart with Helm's own Go code, without a helm binary.

Why a separate script: the Helm bindings on PyPI (``helm-sdkpy`` for ``helm lint``,
``helm-python-sdk`` for offline ``helm template``-style rendering and values-schema checks)
need Python 3.12+, while the service runs on 3.11. ``make deploy-tools`` builds
``.venv-helm`` with them, ``kubernetes-validate`` (the Kubernetes OpenAPI schemas) and
``cloudcoil-models-prometheus-operator`` (models generated from the prometheus-operator CRDs);
the tests in tests/deploy call this script in that venv and read one JSON object from stdout.

    .venv-helm/bin/python deploy/helm/chartcheck.py lint   deploy/helm/orchestrator -f profiles/dev.yaml
    .venv-helm/bin/python deploy/helm/chartcheck.py render deploy/helm/orchestrator -f ... [--set-json '{...}']
    .venv-helm/bin/python deploy/helm/chartcheck.py schema deploy/helm/orchestrator -f ... [--set-json '{...}']
    .venv-helm/bin/python deploy/helm/chartcheck.py batch < jobs.json   # many of the above, one process

``batch`` reads a JSON list of ``{"command", "chart", "values": [files], "set": [objects]}``
and prints the list of results: loading the Go library and the schemas once keeps the tests
to a few seconds.

``render`` prints every object with its template and the result of validating it: against
the Kubernetes schema of ``--kube-version`` (strict: unknown fields are errors), or, for the
prometheus-operator kinds, against the CRD models (unknown fields are errors there too).
A template that calls ``fail`` gives ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import yaml

DEFAULT_KUBE_VERSION = "1.30.0"
RELEASE = "orch"
NAMESPACE = "ai"


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's rule for -f files: maps merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_values(files: list[str], set_json: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for path in files:
        with open(path) as f:
            values = merge(values, yaml.safe_load(f) or {})
    for blob in set_json:
        values = merge(values, json.loads(blob))
    return values


def cmd_lint(args: argparse.Namespace) -> dict[str, Any]:
    """``helm lint`` twice: helm-sdkpy (Helm 3's action.Lint, default values) and
    helm-python-sdk (Helm 4, with the given values, strict, at the given Kubernetes version)."""
    import helm_python
    import helm_sdkpy

    values = load_values(args.values, args.set_json)
    sdkpy = asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration(namespace=NAMESPACE)).run(args.chart))
    v4 = helm_python.lint(args.chart, values=values, strict=True, namespace=NAMESPACE,
                          kube_version=f"v{args.kube_version}")
    errors = [m for m in v4["messages"] if m["severity"] >= 2] + [{"error": e} for e in v4["errors"]]
    errors += [m for m in sdkpy.get("Messages") or [] if m.get("Severity", 0) >= 2]
    errors += [{"error": e} for e in sdkpy.get("Errors") or []]
    return {"ok": not errors, "errors": errors, "helm_sdkpy": sdkpy, "helm_python": v4,
            "helm_version": helm_python.helm_sdk_version()}


def cmd_schema(args: argparse.Namespace) -> dict[str, Any]:
    """values.schema.json against the merged values, by Helm's validator (what install runs)."""
    import helm_python

    values = load_values(args.values, args.set_json)
    with helm_python.Chart.load(args.chart) as chart:
        try:
            chart.validate_schema(values)
        except helm_python.HelmError as exc:
            return {"ok": False, "error": str(exc)}
    return {"ok": True}


def _validate_k8s(obj: dict[str, Any], kube_version: str) -> str | None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, kube_version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in exc.path)
        return f"{path}: {exc.message}"
    except kubernetes_validate.utils.SchemaNotFoundError as exc:
        return f"no schema: {exc}"
    return None


def _strip_empty(value: Any) -> Any:
    """Drop nulls (YAML ``key:`` with nothing) so they compare equal after a model round trip."""
    if isinstance(value, dict):
        return {k: _strip_empty(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_empty(v) for v in value]
    return value


def _validate_monitoring(obj: dict[str, Any]) -> str | None:
    """prometheus-operator kinds against models generated from the operator's CRDs. The models
    ignore unknown fields, so a round trip that loses a field reports that field."""
    from cloudcoil.models.prometheus_operator import v1
    from pydantic import ValidationError

    model = {"ServiceMonitor": v1.ServiceMonitor, "PodMonitor": v1.PodMonitor,
             "PrometheusRule": v1.PrometheusRule}.get(obj["kind"])
    if model is None or obj.get("apiVersion") != "monitoring.coreos.com/v1":
        return f"no schema for {obj.get('apiVersion')}/{obj['kind']}"
    try:
        parsed = model.model_validate(obj)
    except ValidationError as exc:
        return str(exc)
    back = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
    lost = _diff(_strip_empty(obj), _strip_empty(back), "")
    return f"unknown fields: {lost}" if lost else None


def _diff(a: Any, b: Any, path: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key, value in a.items():
            if key not in b:
                out.append(f"{path}/{key}")
            else:
                out += _diff(value, b[key], f"{path}/{key}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}/{i}")]
    return [] if a == b else [f"{path} ({a!r} became {b!r})"]


def cmd_render(args: argparse.Namespace) -> dict[str, Any]:
    import helm_python

    values = load_values(args.values, args.set_json)
    with helm_python.Chart.load(args.chart) as chart:
        try:
            chart.validate_schema(values)
            manifests = chart.render(values, name=args.name, namespace=args.namespace, is_install=True)
        except helm_python.HelmError as exc:
            return {"ok": False, "error": str(exc)}
    objects: list[dict[str, Any]] = []
    notes = ""
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            if not doc:
                continue
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                error = _validate_monitoring(doc)
            else:
                error = _validate_k8s(doc, args.kube_version)
            objects.append({"template": template, "object": doc, "error": error})
    return {"ok": True, "objects": objects, "notes": notes}


def _selectors(node: Any) -> list[str]:
    """Metric names of every vector selector under a parsed PromQL node."""
    import promql_parser as pp

    if isinstance(node, pp.VectorSelector):
        names = [node.name] if node.name else []
        return names + [m.value for m in node.matchers.matchers if m.name == "__name__"]
    if isinstance(node, pp.MatrixSelector):
        return _selectors(node.vector_selector)
    if isinstance(node, pp.BinaryExpr):
        return _selectors(node.lhs) + _selectors(node.rhs)
    if isinstance(node, pp.Call):
        return [n for arg in node.args for n in _selectors(arg)]
    if isinstance(node, pp.AggregateExpr):
        return _selectors(node.expr) + (_selectors(node.param) if node.param is not None else [])
    if isinstance(node, (pp.ParenExpr, pp.UnaryExpr, pp.SubqueryExpr)):
        return _selectors(node.expr)
    return []


def cmd_metric_names(_args: argparse.Namespace) -> list[dict[str, Any]]:
    """PromQL expressions (a JSON list on stdin) parsed by promql-parser (the Rust port of
    Prometheus' parser): the metric names each selects, or the parse error."""
    import promql_parser

    out = []
    for expr in json.load(sys.stdin):
        try:
            out.append({"expr": expr, "names": sorted(set(_selectors(promql_parser.parse(expr))))})
        except Exception as exc:  # the parser raises a plain ValueError-like error with the position
            out.append({"expr": expr, "error": str(exc)})
    return out


COMMANDS = {"lint": cmd_lint, "schema": cmd_schema, "render": cmd_render}


def cmd_batch(_args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for job in json.load(sys.stdin):
        args = argparse.Namespace(chart=job["chart"], values=job.get("values", []),
                                  set_json=[json.dumps(v) for v in job.get("set", [])],
                                  kube_version=job.get("kube_version", DEFAULT_KUBE_VERSION),
                                  name=job.get("name", RELEASE), namespace=job.get("namespace", NAMESPACE))
        results.append(COMMANDS[job["command"]](args))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("batch").set_defaults(fn=cmd_batch)
    sub.add_parser("metric-names").set_defaults(fn=cmd_metric_names)
    for name, fn in COMMANDS.items():
        p = sub.add_parser(name)
        p.add_argument("chart")
        p.add_argument("-f", "--values", action="append", default=[], help="values file (repeatable)")
        p.add_argument("--set-json", action="append", default=[], help="values as a JSON object (repeatable)")
        p.add_argument("--kube-version", default=DEFAULT_KUBE_VERSION)
        p.add_argument("--name", default=RELEASE)
        p.add_argument("--namespace", default=NAMESPACE)
        p.set_defaults(fn=fn)
    args = ap.parse_args(argv)
    result = args.fn(args)
    json.dump(result, sys.stdout, default=str)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

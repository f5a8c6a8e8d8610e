"""Strict JSON bodies: the service accepts only values it can store and send back.

Python's ``json`` (FastAPI's decoder) accepts values that fail later, far from the request: a
lone surrogate (``"\\ud800"``) has no UTF-8 encoding, so a run holding one was stored and then
every response showing it answered 500, its tenant's run listing included, for good; ``NaN``,
``Infinity`` and numbers beyond a double (``1e400``) are not JSON (PostgreSQL refuses them,
SQLite stored ``null`` instead); PostgreSQL text cannot hold NUL (``"\\u0000"``). Bodies are
decoded here, once, before anything is written: I-JSON (RFC 7493), plus no NUL where the body
is stored. Routes of a router built with ``route_class=StrictJSONRoute`` get it for free.

The models then validate strictly (``strict=True``): what the OpenAPI document calls an
integer is one, not ``true`` or ``"1"`` coerced.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine
from typing import Any

import pydantic_core
from fastapi import Request, Response
from fastapi.routing import APIRoute

from orchestrator.errors import InvalidRequest, ValidationFailed

Path = tuple[str | int, ...]
_NUL = "NUL (\\u0000), which PostgreSQL cannot store"


class NotJSON(ValueError):
    """The body is not I-JSON: a syntax error, ``NaN``/``Infinity``, a lone surrogate."""


def decode(body: bytes, *, allow_nul: bool = False) -> Any:
    """The body's value, with integral numbers as ints (see ``_scalar``). Raises ``NotJSON``, or
    ``ValidationFailed`` (code ``unsupported_value``, ``param`` the value's path) for a number
    out of a double's range or, unless ``allow_nul``, a string holding NUL."""
    try:  # pydantic's parser refuses lone surrogates; allow_inf_nan=False refuses NaN / Infinity
        value = pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise NotJSON(f"{exc} (NaN, Infinity and unpaired surrogates such as \\ud800 are refused)") from None
    if not isinstance(value, (dict, list)):
        return _scalar(value, (), allow_nul)
    stack: list[tuple[Any, Path]] = [(value, ())]  # iterative: a deeply nested body cannot exhaust the stack
    while stack:
        container, path = stack.pop()
        for key, item in list(container.items() if isinstance(container, dict) else enumerate(container)):
            if not allow_nul and isinstance(key, str) and "\x00" in key:
                raise _unsupported(path, f"Keys may not contain {_NUL}")
            if isinstance(item, (dict, list)):
                stack.append((item, (*path, key)))
            elif (kept := _scalar(item, (*path, key), allow_nul)) is not item:
                container[key] = kept
    return value


def _scalar(value: Any, path: Path, allow_nul: bool) -> Any:
    """A number or string as the service keeps it. JSON does not tell ``1.0`` from ``1`` (nor
    does JSON Schema's ``integer``), so an integral number up to 2**53 is read as an int: the
    strictly validated models then refuse ``true`` or ``"1"`` for an integer, not ``1.0``."""
    if isinstance(value, str):
        if not allow_nul and "\x00" in value:
            raise _unsupported(path, f"Strings may not contain {_NUL}")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _unsupported(path, "Numbers must be within the range of a double (a JSON number such as 1e400 "
                                     "is not)")
        if value.is_integer() and abs(value) <= 2**53:
            return int(value)
    return value


def _unsupported(path: Path, why: str) -> ValidationFailed:
    param = _param(path)
    return ValidationFailed(f"{why} ({param or 'the body'}).", code="unsupported_value", param=param)


def _param(path: Path) -> str | None:
    """``("input", "items", 0, "name")`` -> ``input.items[0].name``, as the API's ``param``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


class StrictJSONRequest(Request):
    """A request whose ``json()`` is ``decode``: FastAPI parses route bodies with it."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = decode(await self.body())
            except NotJSON as exc:
                raise InvalidRequest(f"Request body is not valid JSON: {exc}.", code="invalid_json") from None
        return self._json


class StrictJSONRoute(APIRoute):
    """Decodes a route's body with ``decode`` before FastAPI reads it. Decoding first, outside
    FastAPI's body handling, lets a refusal reach the API's error handlers as it is (FastAPI
    would turn any error raised while it parses into a bare 400)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def strict(request: Request) -> Response:
            request = StrictJSONRequest(request.scope, request.receive)
            if await request.body():
                await request.json()
            return await handler(request)

        return strict

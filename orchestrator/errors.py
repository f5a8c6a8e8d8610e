"""One error shape for every API failure: ``{"error": {"type", "code", "message", "param"}}``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class APIError(Exception):
    status_code = 500
    type = "api_error"
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "code": self.code, "message": self.message, "param": self.param}}


class InvalidRequest(APIError):
    status_code = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ValidationFailed(InvalidRequest):
    status_code = 422
    code = "validation_error"

    @classmethod
    def first_of(cls, errors: Sequence[Any]) -> ValidationFailed:
        """The API's 422 for pydantic's (or FastAPI's) errors: the first one, its location as
        ``param`` (without FastAPI's ``body``/``query``/``path``/``header`` prefix)."""
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        loc = [str(p) for p in first.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]
        param = ".".join(loc) or None
        return cls(f"{first.get('msg', 'invalid')}" + (f" at {param}" if param else ""), param=param)


class AuthenticationFailed(APIError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(APIError):
    status_code = 404
    type = "not_found_error"
    code = "not_found"


class Conflict(APIError):
    status_code = 409
    type = "conflict_error"
    code = "conflict"


class RequestTimeout(APIError):
    status_code = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(APIError):
    status_code = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RateLimited(APIError):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float, code: str | None = None) -> None:
        seconds = max(1, int(retry_after + 0.999))
        super().__init__(message, code=code, headers={"Retry-After": str(seconds)})
        self.retry_after = seconds


class ServiceUnavailable(APIError):
    status_code = 503
    type = "api_error"
    code = "unavailable"

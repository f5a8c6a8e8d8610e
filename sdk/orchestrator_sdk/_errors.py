"""Typed errors of the SDK, one class per HTTP status the service documents."""

from __future__ import annotations

from typing import Any

import httpx


class OrchestratorError(Exception):
    """Base class of every error the SDK raises."""


class APIConnectionError(OrchestratorError):
    """The service could not be reached, or the connection broke."""


class APITimeoutError(APIConnectionError):
    """The request timed out."""


class StreamError(OrchestratorError):
    """An event stream could not be resumed within its reconnect budget."""


class APIStatusError(OrchestratorError):
    """The service answered with an error body ``{"error": {type, code, message, param}}``."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.status_code = response.status_code
        self.request_id = response.headers.get("x-request-id")
        detail: dict[str, Any] = {}
        try:
            body = response.json()
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                detail = body["error"]
        except ValueError:
            pass
        self.type: str = detail.get("type", "api_error")
        self.code: str = detail.get("code", "http_error")
        self.message: str = detail.get("message") or response.text[:500] or f"HTTP {response.status_code}"
        self.param: str | None = detail.get("param")
        super().__init__(f"{self.status_code} {self.code}: {self.message}")


class BadRequestError(APIStatusError):
    pass


class AuthenticationError(APIStatusError):
    pass


class NotFoundError(APIStatusError):
    pass


class ConflictError(APIStatusError):
    pass


class PayloadTooLargeError(APIStatusError):
    pass


class UnprocessableEntityError(APIStatusError):
    pass


class RateLimitError(APIStatusError):
    pass


class InternalServerError(APIStatusError):
    pass


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError, 401: AuthenticationError, 404: NotFoundError, 409: ConflictError,
    413: PayloadTooLargeError, 422: UnprocessableEntityError, 429: RateLimitError,
}


def error_for(response: httpx.Response) -> APIStatusError:
    if response.status_code >= 500:
        return InternalServerError(response)
    return _BY_STATUS.get(response.status_code, APIStatusError)(response)

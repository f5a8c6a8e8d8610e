"""API keys map to tenants; every ``/v1`` route depends on ``authenticate``.

Keys are compared by their SHA-256 digest (a dict lookup), so a wrong key takes
the same path whatever prefix it shares with a right one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from fastapi import Request

from orchestrator.errors import AuthenticationFailed, RateLimited
from orchestrator.settings import TenantLimits


@dataclass(frozen=True)
class Tenant:
    name: str
    limits: TenantLimits


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    def __init__(self, keys: dict[str, str]) -> None:
        self._by_digest = {_digest(k): tenant for k, tenant in keys.items()}

    def tenant_for(self, key: str) -> str | None:
        return self._by_digest.get(_digest(key))


def _key_from(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return request.headers.get("x-api-key")


async def authenticate(request: Request) -> Tenant:
    """Resolve the caller's tenant and charge one request to its rate limit."""
    state = request.app.state
    key = _key_from(request)
    if not key:
        raise AuthenticationFailed("Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
    name = state.keyring.tenant_for(key)
    if name is None:
        raise AuthenticationFailed("Invalid API key.")
    tenant = Tenant(name, state.settings.limits_for(name))
    request.state.tenant = name
    wait = await state.rate_limiter.check(name, tenant.limits)
    if wait > 0:
        state.metrics.rate_limited.labels("request_rate").inc()
        raise RateLimited(f"Rate limit of {tenant.limits.requests_per_second} requests/s exceeded.", retry_after=wait)
    return tenant

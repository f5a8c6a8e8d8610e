"""Per-tenant request-rate limits (GCRA, a token bucket without a refill timer).

In-process for one replica; in Redis (one Lua script, Redis's own clock) when
several replicas must share a tenant's budget.
"""

from __future__ import annotations

import time

import redis.asyncio as redis

from orchestrator.settings import TenantLimits

_GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local excess = new_tat - now - burst * interval
if excess > 0 then return tostring(excess) end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1)
return '0'
"""


class RateLimiter:
    """``check`` returns 0 when the request may go, else the seconds to wait."""

    async def check(self, tenant: str, limits: TenantLimits) -> float:
        raise NotImplementedError

    async def close(self) -> None:
        return None


class LocalRateLimiter(RateLimiter):
    def __init__(self) -> None:
        self._tat: dict[str, float] = {}

    async def check(self, tenant: str, limits: TenantLimits) -> float:
        if limits.requests_per_second is None:
            return 0.0
        interval = 1.0 / limits.requests_per_second
        burst = limits.burst or 1
        now = time.monotonic()
        tat = max(self._tat.get(tenant, now), now)
        new_tat = tat + interval
        excess = new_tat - now - burst * interval
        if excess > 0:
            return excess
        self._tat[tenant] = new_tat
        return 0.0


class RedisRateLimiter(RateLimiter):
    def __init__(self, url: str) -> None:
        self.redis = redis.from_url(url, decode_responses=True)
        self._script = self.redis.register_script(_GCRA_LUA)

    async def check(self, tenant: str, limits: TenantLimits) -> float:
        if limits.requests_per_second is None:
            return 0.0
        result = await self._script(
            keys=[f"orch:ratelimit:{tenant}"], args=[1.0 / limits.requests_per_second, limits.burst or 1]
        )
        return float(result)

    async def close(self) -> None:
        await self.redis.aclose()


def create_rate_limiter(redis_url: str | None) -> RateLimiter:
    return RedisRateLimiter(redis_url) if redis_url else LocalRateLimiter()

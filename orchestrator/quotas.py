"""Per-tenant request-rate limits (GCRA, a token bucket without a refill timer).

In-process for one replica; in Redis (one Lua script, Redis's own clock) when
several replicas must share a tenant's budget. In Redis, the checks of one tenant that arrive
while its previous check is in flight go as one call (``GroupCommit``): the script admits them
in order, as it would one by one, so a tenant's burst costs a round trip, not one each.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from typing import cast

import redis.asyncio as redis

from orchestrator.group_commit import GroupCommit
from orchestrator.settings import TenantLimits

# ARGV: the emission interval, the burst, how many requests. Admits them in order while the
# bucket allows; returns how many it admitted and, if it refused the rest, the seconds to wait.
_GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local admitted = 0
local excess = 0
for i = 1, n do
  local e = tat + interval - now - burst * interval
  if e > 0 then excess = e; break end
  tat = tat + interval
  admitted = admitted + 1
end
if admitted > 0 then
  redis.call('SET', KEYS[1], tostring(tat), 'PX', math.ceil((tat - now) * 1000) + 1)
end
return {admitted, tostring(excess)}
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
        self._checks: GroupCommit[None, float] = GroupCommit(self._check_many)

    async def check(self, tenant: str, limits: TenantLimits) -> float:
        if limits.requests_per_second is None:
            return 0.0
        return await self._checks.submit((tenant, 1.0 / limits.requests_per_second, limits.burst or 1), None)

    async def _check_many(self, key: Hashable, items: Sequence[None]) -> Sequence[float | BaseException]:
        tenant, interval, burst = cast(tuple[str, float, int], key)
        admitted, excess = await self._script(keys=[f"orch:ratelimit:{tenant}"], args=[interval, burst, len(items)])
        return [0.0] * int(admitted) + [float(excess)] * (len(items) - int(admitted))

    async def close(self) -> None:
        await self.redis.aclose()


def create_rate_limiter(redis_url: str | None) -> RateLimiter:
    return RedisRateLimiter(redis_url) if redis_url else LocalRateLimiter()

"""Rate limits and stream caps shared by every gateway through Redis: the same leaky buckets as limits.py, each
check-and-take one atomic Lua script on Redis's clock, so N gateways enforce a limit once, not N times. While
Redis cannot be reached, each gateway enforces the limits on its own (in process) rather than failing requests."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import redis.asyncio as redis
import structlog
from redis.exceptions import RedisError

from services.gateway.limits import LocalLimits, Rate

log = structlog.get_logger(__name__)
T = TypeVar("T")
_WARN_EVERY_S = 10.0

# KEYS: bucket keys. ARGV[1]: "1" to charge without checking; then per key capacity, rate per second, amount.
# Returns one wait (seconds, as a string: Lua numbers become integers in replies) per key; all "0": taken.
# Hand-written because no Redis client library ships an all-or-nothing multi-bucket leaky bucket.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local force = ARGV[1] == '1'
local levels, waits, refused = {}, {}, false
for i, key in ipairs(KEYS) do
  local cap, rate, amount = tonumber(ARGV[i*3-1]), tonumber(ARGV[i*3]), tonumber(ARGV[i*3+1])
  local v = redis.call('HMGET', key, 'level', 'at')
  local level = tonumber(v[1]) or 0
  local at = tonumber(v[2]) or now
  level = math.max(0, level - math.max(0, now - at) * rate)
  levels[i] = level
  if (not force) and level + amount > cap then
    waits[i] = tostring((level + amount - cap) / rate)
    refused = true
  else
    waits[i] = '0'
  end
end
if not refused then
  for i, key in ipairs(KEYS) do
    local rate, amount = tonumber(ARGV[i*3]), tonumber(ARGV[i*3+1])
    local level = levels[i] + amount
    redis.call('HSET', key, 'level', tostring(level), 'at', tostring(now))
    redis.call('PEXPIRE', key, math.ceil(level / rate * 1000) + 1000)
  end
end
return waits
"""

# KEYS[1]: sorted set of stream ids scored by lease expiry. ARGV: cap, stream id, lease seconds.
# Leases make a slot come back even when the gateway holding it dies without closing the stream.
_OPEN_STREAM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
local expires = now + tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], expires, ARGV[2])
local latest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], math.ceil(tonumber(latest[2]) * 1000))
return 1
"""


class RedisLimits:
    """LimitBackend in Redis (redis.asyncio), keys under prefix."""

    def __init__(self, url: str, prefix: str = "fleetserve:gw:", timeout_s: float = 0.5) -> None:
        self.client = redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.prefix = prefix
        self._take = self.client.register_script(_TAKE)
        self._open = self.client.register_script(_OPEN_STREAM)
        self.fallback = LocalLimits()
        self._warned = -_WARN_EVERY_S
        # Streams opened on the fallback are closed there too, even if Redis is back by then.
        self._local_streams: set[tuple[str, str]] = set()

    async def _or_local(self, shared: Callable[[], Awaitable[T]], local: Callable[[], Awaitable[T]]) -> T:
        try:
            return await shared()
        except (RedisError, OSError) as e:
            now = time.monotonic()
            if now - self._warned >= _WARN_EVERY_S:
                self._warned = now
                log.warning("gateway.redis_unavailable", error=str(e), fallback="in-process limits")
            return await local()

    async def _run(self, wants: Sequence[tuple[Rate, float]], force: bool) -> list[float]:
        keys = [self.prefix + rate.key for rate, _ in wants]
        args: list[str] = ["1" if force else "0"]
        for rate, amount in wants:
            args += [repr(rate.capacity), repr(rate.capacity / rate.period_s), repr(float(amount))]
        return [float(w) for w in await self._take(keys=keys, args=args)]

    async def take(self, wants: Sequence[tuple[Rate, float]]) -> list[tuple[Rate, float]]:
        if not wants:
            return []

        async def shared() -> list[tuple[Rate, float]]:
            waits = await self._run(wants, force=False)
            return [(rate, w) for (rate, _), w in zip(wants, waits, strict=True) if w > 0]

        return await self._or_local(shared, lambda: self.fallback.take(wants))

    async def charge(self, wants: Sequence[tuple[Rate, float]]) -> None:
        wants = [(rate, amount) for rate, amount in wants if amount > 0]
        if wants:
            await self._or_local(lambda: self._run(wants, force=True), lambda: self.fallback.charge(wants))

    async def open_stream(self, key: str, cap: int, stream_id: str, lease_s: float) -> bool:
        async def shared() -> bool:
            return bool(await self._open(keys=[self.prefix + key], args=[cap, stream_id, lease_s]))

        async def local() -> bool:
            opened = await self.fallback.open_stream(key, cap, stream_id, lease_s)
            if opened:
                self._local_streams.add((key, stream_id))
            return opened

        return await self._or_local(shared, local)

    async def close_stream(self, key: str, stream_id: str) -> None:
        if (key, stream_id) in self._local_streams:
            self._local_streams.discard((key, stream_id))
            await self.fallback.close_stream(key, stream_id)
            return

        async def shared() -> None:
            await self.client.zrem(self.prefix + key, stream_id)

        async def local() -> None:
            return None  # the lease frees the slot in Redis

        await self._or_local(shared, local)

    async def close(self) -> None:
        await self.client.aclose()

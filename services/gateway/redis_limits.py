"""Rate limits and stream caps shared by every gateway through Redis: the same leaky buckets as limits.py, each
check-and-take one atomic Lua script on Redis's clock, so N gateways enforce a limit once, not N times.

While Redis cannot be reached (down, or hung: each call then waits for the socket timeout), a circuit breaker
sends every request to an in-process fallback at once, and a background probe closes it when Redis answers
again. During the fallback each gateway enforces its share of each limit (1/N of it, N the number of gateways),
so the fleet as a whole stays near the limit rather than at N times it. N is configured, or learned from two
places every gateway keeps a presence lease in: Redis (while it is up) and the gateway database (shared by the
gateways that share tenants), so a gateway that starts while Redis is down still counts the others; with
nothing learned yet, a conservative default (presence.FleetSize)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import redis.asyncio as redis
import structlog
from prometheus_client.registry import CollectorRegistry
from redis.exceptions import RedisError

from services.gateway.db import DatabaseError
from services.gateway.limits import LocalLimits, Rate
from services.gateway.presence import FleetSize, PresenceTable
from shared import prom
from shared.drain import cancelled_by_caller
from shared.resilience import BreakerState, CircuitBreaker

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

# KEYS[1]: sorted set of gateway ids scored by presence expiry. ARGV: this gateway's id, ttl seconds.
# Returns the ids of the gateways present (this one included): a gateway that died without leaving is gone
# once its entry expires (ttl), so a count never stays too high.
_PRESENT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 2000))
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


async def _loop_call(call: Awaitable[T]) -> T:
    """Await a background loop's call (Redis, the gateway database), then raise CancelledError if this task was
    cancelled during it, whether the call returned or raised: asyncio.wait_for on Python 3.11 (redis-py's socket
    send) returns the result of an inner call that finished as the cancel came, and redis-py may turn a cancel
    that lands mid-command into a ConnectionError. A loop that carried on would never end, and whoever awaits it
    after cancelling it (asyncio.run's shutdown, a crashed gateway's test) would wait forever. Every await of a
    call in a loop goes through here."""
    try:
        result = await call
    except Exception as e:
        if cancelled_by_caller():
            raise asyncio.CancelledError from e
        raise
    if cancelled_by_caller():
        raise asyncio.CancelledError
    return result


class FleetShareLimits(LocalLimits):
    """The in-process fallback: each limit divided by the number of gateways. A request bigger than this
    gateway's share of a bucket is admitted when the bucket has room for the share (and charged in full, so
    the bucket's debt delays later requests): the long-run rate stays at the share without refusing forever
    a prompt larger than it."""

    def __init__(self, gateways: Callable[[], int]) -> None:
        super().__init__()
        self._gateways = gateways

    def share(self, rate: Rate) -> Rate:
        n = max(1, self._gateways())
        if n == 1:
            return rate
        return Rate(rate.key, rate.capacity / n, rate.period_s, rate.subject, rate.what)

    async def take(self, wants: Sequence[tuple[Rate, float]]) -> list[tuple[Rate, float]]:
        buckets = [(rate, self._bucket(self.share(rate)), amount) for rate, amount in wants]
        refused = []
        for rate, b, amount in buckets:
            fits = min(amount, b.max_rate)
            if not b.has_capacity(fits):
                refused.append((rate, b.wait_s(fits)))
        if not refused:
            for _, b, amount in buckets:
                b.charge(amount)
        return refused

    async def charge(self, wants: Sequence[tuple[Rate, float]]) -> None:
        await super().charge([(self.share(rate), amount) for rate, amount in wants])

    async def open_stream(self, key: str, cap: int, stream_id: str, lease_s: float) -> bool:
        share = max(1, round(cap / max(1, self._gateways())))
        return await super().open_stream(key, share, stream_id, lease_s)


class RedisLimits:
    """LimitBackend in Redis (redis.asyncio), keys under prefix, behind a circuit breaker."""

    def __init__(
        self,
        url: str,
        prefix: str = "fleetserve:gw:",
        timeout_s: float = 0.5,
        *,
        fallback_gateways: int = 0,
        unknown_gateways: int = 2,
        presence_interval_s: float = 1.0,
        presence: PresenceTable | None = None,
        metrics_registry: CollectorRegistry | None = None,
        breaker: CircuitBreaker | None = None,
        gateway_id: str = "",
    ) -> None:
        self.client = redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.prefix = prefix
        self._take = self.client.register_script(_TAKE)
        self._open = self.client.register_script(_OPEN_STREAM)
        self._present = self.client.register_script(_PRESENT)
        self.fleet = FleetSize(fallback_gateways, unknown_gateways)
        self.presence_interval_s = presence_interval_s
        # The gateway database's presence table (None: Redis's presence set is the only one read).
        self.presence = presence
        self.gateway_id = gateway_id or uuid.uuid4().hex
        self.fallback = FleetShareLimits(self.fleet)
        self.breaker = breaker or CircuitBreaker(
            failure_threshold=3, open_s=1.0, max_open_s=10.0, on_change=self._breaker_changed
        )
        self._warned = -_WARN_EVERY_S
        self._db_warned = -_WARN_EVERY_S
        self._unknown_logged = False
        self._logged_size: tuple[int, str] | None = None
        # Streams opened on the fallback are closed there too, even if Redis is back by then.
        self._local_streams: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task] = set()
        self._probing = False
        self._closing = False
        self._metrics = _FallbackMetrics(metrics_registry) if metrics_registry is not None else None
        self._publish()

    @property
    def gateways_seen(self) -> int | None:
        """The gateways counted at the last presence round (None: nothing read yet)."""
        return self.fleet.seen

    def gateways(self) -> int:
        """The number of gateways sharing the limits: configured, else seen, else the conservative default."""
        return self.fleet()

    def start(self) -> None:
        """Start keeping this gateway's presence in Redis and the gateway database (how every gateway learns the
        fleet's size)."""
        self._spawn(self._presence_loop())
        if self.presence is not None:
            # Its own loop: a hung Redis must not delay the database's reading, nor a slow database Redis's.
            self._spawn(self._db_presence_loop())

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _presence_loop(self) -> None:
        ttl = self.presence_interval_s * 3
        # Ends when cancelled, also when redis-py swallowed the cancel (_loop_call), or once close() began.
        while not self._closing:
            if self.breaker.current() is BreakerState.CLOSED:
                try:
                    ids = await _loop_call(
                        self._present(keys=[self.prefix + "gateways"], args=[self.gateway_id, ttl])
                    )
                except (RedisError, OSError) as e:
                    self._fault(e)
                else:
                    self.fleet.redis = frozenset(i.decode() if isinstance(i, bytes) else str(i) for i in ids)
                    self._recounted()
            await asyncio.sleep(self.presence_interval_s)

    async def _db_presence_loop(self) -> None:
        assert self.presence is not None
        ttl = self.presence_interval_s * 3
        while not self._closing:
            try:
                reading = await _loop_call(self.presence.renew(self.gateway_id, ttl))
            except DatabaseError as e:  # keep the last reading: nothing newer is known
                now = time.monotonic()
                if now - self._db_warned >= _WARN_EVERY_S:
                    self._db_warned = now
                    log.warning("gateway.presence_db_unavailable", error=str(e), gateways=self.gateways())
            else:
                self.fleet.read_database(reading)
                self._recounted()
            await asyncio.sleep(self.presence_interval_s)

    def _recounted(self) -> None:
        self.fleet.recount()
        self._publish()
        size = (self.gateways(), self.fleet.source)
        if size != self._logged_size:
            self._logged_size = size
            log.info("gateway.limits_fleet_size", gateways=size[0], source=size[1])

    def _publish(self) -> None:
        if self._metrics is not None:
            self._metrics.gateways.set(self.gateways())
            self._metrics.unknown.set(1 if self.fleet.source == "default" else 0)
            self._metrics.active.set(0 if self.breaker.state is BreakerState.CLOSED else 1)

    def _breaker_changed(self, old: BreakerState, new: BreakerState) -> None:
        if new is BreakerState.OPEN and old is BreakerState.CLOSED:
            log.warning(
                "gateway.redis_breaker_opened",
                fallback="in-process limits, this gateway's share",
                gateways=self.gateways(),
                gateways_source=self.fleet.source,
            )
            if self.fleet.source == "default" and not self._unknown_logged:
                self._unknown_logged = True
                log.warning(
                    "gateway.limits_fleet_size_unknown",
                    gateways=self.gateways(),
                    hint="no gateway count seen in Redis or the gateway database yet: each limit is divided by "
                    "this default (--limits-fallback-unknown-gateways); set --limits-fallback-gateways to the "
                    "fleet's size to know it",
                )
        elif new is BreakerState.CLOSED:
            log.info("gateway.redis_breaker_closed")
        if self._metrics is not None:
            self._metrics.active.set(0 if new is BreakerState.CLOSED else 1)

    def _fault(self, e: BaseException) -> None:
        self.breaker.on_fault()
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY_S:
            self._warned = now
            log.warning(
                "gateway.redis_unavailable", error=str(e) or type(e).__name__, fallback="in-process limits"
            )
        if self.breaker.state is not BreakerState.CLOSED and not self._probing:
            self._probing = True
            self._spawn(self._probe())

    async def _probe(self) -> None:
        """While the breaker is open, PING Redis each time its open period ends: an answer closes it (requests go
        back to Redis), silence opens it again for longer. Requests never wait on a probe."""
        try:
            while not self._closing and self.breaker.current() is not BreakerState.CLOSED:
                await asyncio.sleep(max(0.05, self.breaker.open_seconds_left()))
                if self.breaker.current() is not BreakerState.HALF_OPEN:
                    continue
                try:
                    await _loop_call(self.client.ping())
                except (RedisError, OSError):
                    self.breaker.on_fault()  # half-open: open again, for twice as long
                else:
                    self.breaker.on_success()
        finally:
            self._probing = False

    async def _or_local(self, shared: Callable[[], Awaitable[T]], local: Callable[[], Awaitable[T]]) -> T:
        if self.breaker.current() is not BreakerState.CLOSED:
            return await local()
        try:
            result = await shared()
        except (RedisError, OSError) as e:
            self._fault(e)
            return await local()
        self.breaker.on_success()
        return result

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
        self._closing = True
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.presence is not None:
            try:  # the others stop counting this gateway at their next round, not when its lease ends
                await asyncio.wait_for(self.presence.leave(self.gateway_id), 1.0)
            except (DatabaseError, TimeoutError):
                pass
        if self.breaker.current() is BreakerState.CLOSED:
            try:  # leave the count at once rather than when the presence entry expires
                # At most a second: a Redis that hangs must not hold a stopping gateway for --redis-timeout-s
                # (its entry expires on its own within 3 presence intervals).
                await asyncio.wait_for(self.client.zrem(self.prefix + "gateways", self.gateway_id), 1.0)
            except (RedisError, OSError, TimeoutError):
                pass
        await self.client.aclose()


class _FallbackMetrics:
    """What an operator alerts on: the fallback in use, and the fleet size it divides by (known or a default)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.active = prom.gauge(
            "fleetserve:limits_fallback_active",
            "1 while Redis is unreachable and this gateway enforces its share of every limit in process.",
            (),
            registry,
            multiprocess_mode="livemax",
        )
        self.gateways = prom.gauge(
            "fleetserve:limits_fallback_gateways",
            "N, the number of gateways the in-process fallback divides each limit by (configured, seen, or the "
            "default while nothing is known).",
            (),
            registry,
            multiprocess_mode="livemax",
        )
        self.unknown = prom.gauge(
            "fleetserve:limits_fallback_gateways_unknown",
            "1 while N is the conservative default: no gateway count seen in Redis or the gateway database yet.",
            (),
            registry,
            multiprocess_mode="livemax",
        )

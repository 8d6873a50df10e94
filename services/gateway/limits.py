"""Rate limits and concurrent-stream caps kept in this process (one gateway): aiolimiter leaky buckets keyed by
tenant and key, checked and taken all-or-nothing, with the wait a refused request should honour."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from aiolimiter import AsyncLimiter

from shared.workers import share

_MAX_BUCKETS = 100_000


@dataclass(frozen=True, slots=True)
class Rate:
    """One rate limit: the bucket `key` holds `capacity` units that drain completely in `period_s` seconds."""

    key: str
    capacity: float
    period_s: float
    # Who is limited and by what, for QuotaFailure ("tenant:acme", "5 requests per second").
    subject: str
    what: str


class LimitBackend(Protocol):
    """Where limit state lives: this process (LocalLimits) or Redis, shared by every gateway (RedisLimits)."""

    async def take(self, wants: Sequence[tuple[Rate, float]]) -> list[tuple[Rate, float]]:
        """Take every amount if all fit; else take nothing and return each refused (rate, seconds to wait)."""
        ...

    async def charge(self, wants: Sequence[tuple[Rate, float]]) -> None:
        """Add usage measured after admission (completion tokens), even past capacity: a later request waits."""
        ...

    async def open_stream(self, key: str, cap: int, stream_id: str, lease_s: float) -> bool:
        """Hold one of cap stream slots under key for stream_id (at most lease_s); False when all are held."""
        ...

    async def close_stream(self, key: str, stream_id: str) -> None:
        """Give back stream_id's slot."""
        ...

    def start(self) -> None:
        """Start background work, if any (called once the event loop runs)."""
        ...

    async def close(self) -> None: ...


class Bucket(AsyncLimiter):
    """aiolimiter's leaky bucket plus what admission needs and it lacks: the wait until an amount fits, and
    charging after the fact past capacity. Both read the bucket's level (aiolimiter keeps it in _level, drained
    by _leak()); the library's acquire() would block, and the gateway must refuse instead of queueing."""

    def wait_s(self, amount: float) -> float:
        self._leak()
        return max(0.0, self._level + amount - self.max_rate) / self._rate_per_sec

    def charge(self, amount: float) -> None:
        self._leak()
        self._level += amount


class LocalLimits:
    """LimitBackend in this process. Single-threaded asyncio: check-then-take cannot interleave."""

    def __init__(self) -> None:
        self._buckets: dict[str, Bucket] = {}
        self._streams: dict[str, set[str]] = {}

    def _bucket(self, rate: Rate) -> Bucket:
        b = self._buckets.get(rate.key)
        if b is None or b.max_rate != rate.capacity or b.time_period != rate.period_s:
            # A limit changed by the admin starts a fresh bucket (an old level means nothing against it).
            if len(self._buckets) >= _MAX_BUCKETS:
                self._buckets.clear()
            b = self._buckets[rate.key] = Bucket(rate.capacity, rate.period_s)
        return b

    async def take(self, wants: Sequence[tuple[Rate, float]]) -> list[tuple[Rate, float]]:
        buckets = [(rate, self._bucket(rate), amount) for rate, amount in wants]
        refused = [(rate, b.wait_s(amount)) for rate, b, amount in buckets if not b.has_capacity(amount)]
        if not refused:
            for _, b, amount in buckets:
                b.charge(amount)
        return refused

    async def charge(self, wants: Sequence[tuple[Rate, float]]) -> None:
        for rate, amount in wants:
            if amount > 0:
                self._bucket(rate).charge(amount)

    async def open_stream(self, key: str, cap: int, stream_id: str, lease_s: float) -> bool:
        held = self._streams.setdefault(key, set())
        if len(held) >= cap:
            return False
        held.add(stream_id)
        return True

    async def close_stream(self, key: str, stream_id: str) -> None:
        held = self._streams.get(key)
        if held is not None:
            held.discard(stream_id)
            if not held:
                del self._streams[key]

    def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class SplitLimits:
    """One gateway worker's exact share of every limit, for --workers N without Redis: worker i of N holds 1/N of
    each rate bucket's capacity and shared.workers.share() of each stream cap, so the workers together never
    admit more than the limit. A tenant whose connections all reach one worker gets only that worker's share
    (with --redis-url the limits are fleet-exact instead)."""

    def __init__(self, inner: LimitBackend, index: int, count: int) -> None:
        self.inner = inner
        self.index = index
        self.count = count

    def _rate(self, rate: Rate) -> Rate:
        return dataclasses.replace(rate, capacity=rate.capacity / self.count)

    async def take(self, wants: Sequence[tuple[Rate, float]]) -> list[tuple[Rate, float]]:
        refused = await self.inner.take([(self._rate(r), a) for r, a in wants])
        if not refused:
            return refused
        # Name the tenant's own limit in QuotaFailure, not this worker's share of it.
        by_key = {r.key: r for r, _ in wants}
        return [(by_key[r.key], wait) for r, wait in refused]

    async def charge(self, wants: Sequence[tuple[Rate, float]]) -> None:
        await self.inner.charge([(self._rate(r), a) for r, a in wants])

    async def open_stream(self, key: str, cap: int, stream_id: str, lease_s: float) -> bool:
        mine = share(cap, self.index, self.count)
        return mine > 0 and await self.inner.open_stream(key, mine, stream_id, lease_s)

    async def close_stream(self, key: str, stream_id: str) -> None:
        await self.inner.close_stream(key, stream_id)

    def start(self) -> None:
        self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

"""The limits backend when Redis fails: a hung Redis (SIGSTOP: connections open, nothing answers) or a dead one
opens the breaker after a few timeouts, requests then go to the in-process fallback without waiting on Redis,
a probe closes the breaker once Redis answers; during the fallback each gateway enforces its share of a limit
(1/N, N the gateways seen in the gateway database's presence table and in Redis's), so the fleet stays near
the limit instead of N times it, also when Redis was down before any gateway saw the others there."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import structlog
from prometheus_client import CollectorRegistry

from services.gateway.limits import Rate
from services.gateway.presence import PresenceTable
from services.gateway.redis_limits import RedisLimits
from services.gateway.schema import open_accounts
from shared.resilience import BreakerState
from tests.chaos.report import record
from tests.integration.test_router import closed_port_address
from tests.support import assert_eventually

# 30 requests per 10 s across the fleet: a burst of 30, then 3 per second.
FLEET_RATE = Rate("t:x:rps", 30.0, 10.0, "tenant:x", "30 requests per 10 seconds")


@contextlib.asynccontextmanager
async def gateways(url: str, n: int, prefix: str, sees: int | None = None):
    """n limits backends as n gateways would hold them, presence started, each seeing all n (or `sees`: others
    are up already)."""
    backends = [RedisLimits(url, prefix=prefix, timeout_s=0.3, presence_interval_s=0.1) for _ in range(n)]
    try:
        for b in backends:
            b.start()
        await assert_eventually(lambda: all(b.gateways_seen == (sees or n) for b in backends), timeout_s=10)
        yield backends
    finally:
        for b in backends:
            await b.close()


async def _admitted(backend: RedisLimits, attempts: int) -> int:
    return sum([not await backend.take([(FLEET_RATE, 1.0)]) for _ in range(attempts)])


async def test_hung_redis_opens_the_breaker_and_requests_stop_waiting(redis_server):
    """Redis SIGSTOPped: a few calls time out and open the breaker; the next 200 complete without Redis (bounded
    at 10 s in all: each would wait 0.3 s on the socket if they went to Redis); after SIGCONT the probe closes
    the breaker and takes are shared through Redis again."""
    async with gateways(redis_server.url, 1, "b1:") as (gw,):
        assert await gw.take([(FLEET_RATE, 1.0)]) == []
        redis_server.hang()
        try:
            await asyncio.gather(*(gw.take([(FLEET_RATE, 1.0)]) for _ in range(3)))
            assert gw.breaker.state is BreakerState.OPEN
            await asyncio.wait_for(_admitted(gw, 200), 10)
            assert gw.breaker.state is not BreakerState.CLOSED
        finally:
            redis_server.resume()
        await assert_eventually(lambda: gw.breaker.current() is BreakerState.CLOSED, timeout_s=30)
        # Back on Redis: the bucket there is what a second gateway sees.
        await gw.take([(Rate("t:y:rps", 1.0, 60.0, "tenant:y", "1 per minute"), 1.0)])
        async with gateways(redis_server.url, 1, "b1:", sees=2) as (other,):
            assert await other.take([(Rate("t:y:rps", 1.0, 60.0, "tenant:y", "1 per minute"), 1.0)])


async def test_each_gateway_enforces_its_share_while_redis_is_down(redis_server):
    """Three gateways learned from Redis that there are three; with Redis killed, together they admit about the
    fleet's 30 (10 each), not 90; with Redis back, one bucket is shared again."""
    async with gateways(redis_server.url, 3, "b2:") as gws:
        redis_server.kill()
        admitted = 0
        for gw in gws:  # a refused connection is a fault at once: 3 open the breaker (and go to the fallback)
            refusals = await asyncio.gather(*(gw.take([(FLEET_RATE, 1.0)]) for _ in range(3)))
            admitted += refusals.count([])
            assert gw.breaker.state is BreakerState.OPEN
        admitted += sum([await _admitted(gw, 40) for gw in gws])
        # 10 each from the burst; a request or two more each as the share drains (0.1/s per gateway).
        print(f"fleet share during the outage: {admitted} admitted by 3 gateways, limit 30")
        assert 30 <= admitted <= 36, admitted
        redis_server.restart()
        await assert_eventually(
            lambda: all(gw.breaker.current() is BreakerState.CLOSED for gw in gws), timeout_s=30
        )
        # Fresh Redis: one bucket of 30 across all three (plus what drains at 3/s while the 60 takes run).
        shared = sum([await _admitted(gw, 20) for gw in gws])
        assert 30 <= shared <= 34, shared


async def test_each_gateway_enforces_its_share_while_redis_hangs(redis_server):
    """The same with Redis hung (SIGSTOP): each gateway's first takes wait out the socket timeout and open its
    breaker; during the outage the three together stay within 10% of the fleet's 30."""
    async with gateways(redis_server.url, 3, "b5:") as gws:
        redis_server.hang()
        try:
            admitted = 0
            for gw in gws:  # each of these waits the 0.3 s socket timeout; 3 faults open the breaker
                outcomes = await asyncio.gather(*(gw.take([(FLEET_RATE, 1.0)]) for _ in range(3)))
                admitted += outcomes.count([])
                assert gw.breaker.state is BreakerState.OPEN
            admitted += sum([await asyncio.wait_for(_admitted(gw, 40), 10) for gw in gws])
        finally:
            redis_server.resume()
        print(f"fleet share while Redis hangs: {admitted} admitted by 3 gateways, limit 30")
        assert 27 <= admitted <= 33, admitted  # within 10% of the fleet-wide limit
        record("redis_hung_three_gateways_share", limit=30, admitted=admitted, gateways=3)


async def test_stream_caps_are_shared_too_while_redis_is_down(redis_server):
    """A cap of 6 concurrent streams: with Redis down, each of 3 gateways holds at most 2."""
    async with gateways(redis_server.url, 3, "b3:") as gws:
        redis_server.kill()
        for gw in gws:
            await asyncio.gather(*(gw.take([(FLEET_RATE, 1.0)]) for _ in range(3)))
        opened = [sum([await gw.open_stream("s:x", 6, f"r{i}", 60) for i in range(5)]) for gw in gws]
        assert opened == [2, 2, 2]


@pytest.mark.parametrize("configured", [5])
async def test_a_configured_gateway_count_wins(redis_server, configured):
    """--limits-fallback-gateways N overrides the count seen in Redis."""
    gw = RedisLimits(redis_server.url, prefix="b4:", fallback_gateways=configured)
    try:
        gw.start()
        await assert_eventually(lambda: gw.gateways_seen == 1, timeout_s=5)
        assert gw.gateways() == configured
        assert gw.fallback.share(FLEET_RATE).capacity == 6.0
    finally:
        await gw.close()


@contextlib.asynccontextmanager
async def db_gateways(redis_url: str, db_url: str, n: int, prefix: str):
    """n limits backends as n gateways would hold them, each with its own connection to one gateway database
    (its presence table) and to Redis; presence started; closed (leaving both) at the end."""
    dbs = [await open_accounts(db_url) for _ in range(n)]
    # Rounds of 0.25 s (leases of 0.75 s): with 0.1 s ones a round late by 0.2 s on a loaded box let a live
    # gateway's database lease run out, and a read N = 2 where the test needs 3 (3 of 300 runs under load).
    backends = [
        RedisLimits(
            redis_url, prefix=prefix, timeout_s=0.3, presence_interval_s=0.25, presence=PresenceTable(db)
        )
        for db in dbs
    ]
    try:
        for b in backends:
            b.start()
        yield backends
    finally:
        # Bounded, so that a close that never ends fails here, naming this await, instead of at pytest's timeout.
        for b in backends:
            await asyncio.wait_for(b.close(), 10)
        for db in dbs:
            await asyncio.wait_for(db.close(), 10)


async def _crash(gw: RedisLimits) -> None:
    """The backend of a gateway that died: its presence rounds stop, it says goodbye to neither Redis nor the
    database (its leases run out on their own)."""
    for t in list(gw._tasks):
        t.cancel()
    await asyncio.gather(*gw._tasks, return_exceptions=True)
    gw._closing = True
    await gw.client.aclose()


async def test_cancelled_background_tasks_end_even_when_redis_py_loses_the_cancel(redis_server):
    """A limits backend's background tasks end when they are cancelled (as asyncio.run's shutdown and _crash do),
    not only once close() began: a cancel that came as redis-py's socket send finished was lost in Python 3.11's
    asyncio.wait_for, and the presence loop went on forever (test_a_gateway_that_leaves... hung 120 s in _crash).
    The cancel is swept over the first loop turns of a start, where the connection's handshake sends (here 14 of
    the first 80 turns lost it)."""
    for turns in range(40):
        gw = RedisLimits(redis_server.url, prefix="c1:", timeout_s=0.3, presence_interval_s=0.001)
        try:
            gw.start()
            for _ in range(turns):
                await asyncio.sleep(0)
            tasks = list(gw._tasks)
            for t in tasks:
                t.cancel()
            _, running = await asyncio.wait(tasks, timeout=2)
            assert not running, (
                f"still running 2 s after a cancel {turns} loop turns into the start: {running}"
            )
        finally:
            await gw.close()


async def test_gateways_started_while_redis_is_down_enforce_the_limit_once(redis_server, db_url):
    """Redis dead before any gateway's first presence round: three gateways never see each other in Redis, yet
    they count each other in the gateway database they share and together admit about the fleet's 30 (10 each
    plus what drains), not 90 (each granting the whole limit, what they did when N was only learned in Redis)."""
    redis_server.kill()
    async with db_gateways(redis_server.url, db_url, 3, "d1:") as gws:
        await assert_eventually(lambda: all(gw.gateways() == 3 for gw in gws), timeout_s=10)
        assert all(gw.fleet.redis is None for gw in gws)  # nothing was ever read from Redis
        admitted = sum([await _admitted(gw, 40) for gw in gws])
        print(f"fleet share, Redis down from the start: {admitted} admitted by 3 gateways, limit 30")
        assert 30 <= admitted <= 36, admitted


async def test_a_gateway_that_leaves_during_the_outage_stops_being_counted(redis_server, db_url):
    """Three gateways saw each other in Redis; Redis dies; one stops (goodbye in the database) and one crashes
    (its lease runs out): the last one's N goes from 3 (Redis's last word) to 1, so it grants the whole limit
    again instead of a third of it for as long as the outage lasts."""
    async with db_gateways(redis_server.url, db_url, 3, "d2:") as (a, b, c):
        await assert_eventually(
            lambda: all(gw.fleet.redis is not None and len(gw.fleet.redis) == 3 for gw in (a, b, c))
        )
        redis_server.kill()
        await asyncio.gather(*(a.take([(FLEET_RATE, 1.0)]) for _ in range(3)))  # opens a's breaker
        assert a.breaker.state is BreakerState.OPEN and a.gateways() == 3
        await b.close()
        await assert_eventually(lambda: a.gateways() == 2, timeout_s=10)
        await _crash(c)
        await assert_eventually(lambda: a.gateways() == 1, timeout_s=10)
        assert len(a.fleet.redis) == 3  # Redis's last reading still names all three
        assert await asyncio.wait_for(_admitted(a, 40), 10) >= 30


async def test_a_crashed_gateway_ages_out_of_redis_presence(redis_server):
    """A gateway that dies without leaving stops being counted in Redis's presence set once its entry expires
    (3 presence intervals): the survivor's count goes from 2 back to 1 while Redis is up."""
    async with gateways(redis_server.url, 2, "d3:") as (a, b):
        await _crash(b)
        await assert_eventually(lambda: a.gateways_seen == 1, timeout_s=10)


async def test_with_nothing_known_the_fallback_divides_by_the_conservative_default():
    """A gateway whose Redis never answered and that has no presence table knows no fleet size: it divides each
    limit by the default (2), not 1, says so once in a warning however often the breaker opens, and exports it
    (fleetserve:limits_fallback_gateways_unknown 1, fleetserve:limits_fallback_active 1)."""
    registry = CollectorRegistry()
    gw = RedisLimits(
        f"redis://{closed_port_address()}/0", prefix="d4:", presence_interval_s=0.1, metrics_registry=registry
    )
    try:
        with structlog.testing.capture_logs() as logs:
            gw.start()
            for _ in range(2):  # the breaker opens; after a probe fails it opens again
                await asyncio.gather(*(gw.take([(FLEET_RATE, 1.0)]) for _ in range(3)))
                await assert_eventually(lambda: gw.breaker.current() is BreakerState.OPEN, timeout_s=10)
                gw.breaker.on_success()
            await asyncio.gather(*(gw.take([(FLEET_RATE, 1.0)]) for _ in range(3)))
        assert gw.gateways() == 2 and gw.fleet.source == "default"
        assert gw.fallback.share(FLEET_RATE).capacity == 15.0
        unknown = [e for e in logs if e["event"] == "gateway.limits_fleet_size_unknown"]
        assert len(unknown) == 1 and unknown[0]["log_level"] == "warning" and unknown[0]["gateways"] == 2
        assert registry.get_sample_value("fleetserve:limits_fallback_gateways_unknown") == 1.0
        assert registry.get_sample_value("fleetserve:limits_fallback_gateways") == 2.0
        assert registry.get_sample_value("fleetserve:limits_fallback_active") == 1.0
    finally:
        await gw.close()

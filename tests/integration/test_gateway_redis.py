"""Limits shared through a real redis-server on loopback: buckets and stream caps seen alike by two clients,
stream leases, the in-process fallback while Redis is down, and two gateway processes enforcing one tenant's
limit once between them, with Redis up and with Redis down since before they started."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import redis.asyncio as redis
from fleetserve.inference.v1 import inference_service_pb2 as pb
from fleetserve.inference.v1 import inference_service_pb2_grpc as pb_grpc

from services.gateway.config import GatewaySettings
from services.gateway.limits import Rate
from services.gateway.pipeline import limit_backend
from services.gateway.redis_limits import RedisLimits
from services.gateway.schema import open_accounts
from services.gateway.tenants import TenantStore
from shared.errors import details_of
from tests.integration.test_router import API_KEY, MODEL, closed_port_address, in_process_fleet
from tests.support import assert_eventually, ready_address

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parents[2]
RPS = Rate("t:a:rps", 2.0, 1.0, "tenant:a", "2 requests per second")


def free_port() -> int:
    """A port nothing listens on now (redis-server cannot bind port 0 and report it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def redis_url(tmp_path_factory):
    """A redis-server of its own on loopback, without persistence; stopped at the end."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip(
            "redis-server is not installed and could not be: `make test` installs it (apt-get install "
            "redis-server); the Redis-backed limits are untested here"
        )
    port = free_port()
    # Popen, as the launcher spawns (vfork, safe under uvloop); it returns at once.
    proc = subprocess.Popen(  # noqa: ASYNC220
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp_path_factory.mktemp("redis"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.from_url(url)
    try:
        await assert_eventually(lambda: _pings(client), timeout_s=10, message="redis-server did not start")
        yield url
    finally:
        await client.aclose()
        proc.terminate()
        proc.wait(10)


async def _redis_now(client) -> float:
    """Redis's clock, the one its buckets drain by."""
    seconds, micros = await client.time()
    return seconds + micros / 1e6


async def _pings(client) -> bool:
    try:
        return await client.ping()
    except (redis.ConnectionError, OSError):
        return False


@contextlib.asynccontextmanager
async def limits(url: str, prefix: str):
    lim = RedisLimits(url, prefix=prefix)
    try:
        yield lim
    finally:
        await lim.close()


async def test_two_clients_share_one_bucket(redis_url):
    """What one gateway takes, another sees: two fit a 2/s bucket across both, the third is refused with the
    time until one drains; a refusal takes nothing from the other buckets."""
    async with limits(redis_url, "t1:") as a, limits(redis_url, "t1:") as b:
        tpm = Rate("t:a:tpm", 100.0, 60.0, "tenant:a", "100 tokens per minute")
        assert await a.take([(RPS, 1), (tpm, 10)]) == []
        assert await b.take([(RPS, 1), (tpm, 10)]) == []
        refused = await a.take([(RPS, 1), (tpm, 10)])
        assert [r.key for r, _ in refused] == [RPS.key] and 0.3 < refused[0][1] <= 0.5
        # tpm was not charged by the refusal: 80 tokens are left, not 70.
        assert await b.take([(tpm, 80)]) == []


async def test_charges_overdraw_and_delay_the_next_take(redis_url):
    """Completion tokens charged past capacity make the next request wait for the excess to drain."""
    async with limits(redis_url, "t2:") as a, limits(redis_url, "t2:") as b:
        tpm = Rate("t:a:tpm", 600.0, 60.0, "tenant:a", "600 tokens per minute")
        await a.charge([(tpm, 1000)])
        ((rate, wait),) = await b.take([(tpm, 10)])
        assert rate == tpm and 40 < wait <= 41


async def test_stream_slots_are_shared_and_leased(redis_url):
    """A stream cap holds across clients; closing frees a slot, and so does a lease that runs out (a gateway
    that died holding it)."""
    async with limits(redis_url, "t3:") as a, limits(redis_url, "t3:") as b:
        assert await a.open_stream("s:a", 1, "r1", 60)
        assert not await b.open_stream("s:a", 1, "r2", 60)
        await a.close_stream("s:a", "r1")
        assert await b.open_stream("s:a", 1, "r2", 0.2)
        assert not await a.open_stream("s:a", 1, "r3", 60)
        await assert_eventually(lambda: a.open_stream("s:a", 1, "r3", 60), timeout_s=5)


async def test_limits_fall_back_to_the_process_while_redis_is_down():
    """With Redis unreachable, requests are limited in process instead of failing."""
    async with limits(f"redis://{closed_port_address()}/0", "t4:") as lim:
        assert await lim.take([(RPS, 2)]) == []
        assert [r for r, _ in await lim.take([(RPS, 1)])] == [RPS]
        assert await lim.open_stream("s:a", 1, "r1", 60)
        await lim.close_stream("s:a", "r1")
        assert await lim.open_stream("s:a", 1, "r2", 60)


async def test_redis_timeout_s_bounds_each_call_to_a_redis_that_stopped_answering(tmp_path):
    """--redis-timeout-s reaches the gateway's Redis client: against a peer that accepts connections and never
    answers (a hung Redis), a request is checked against the in-process fallback once that much time has
    passed, and not before."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)  # connections complete in the kernel's backlog; nothing ever reads or answers them
        url = f"redis://127.0.0.1:{hung.getsockname()[1]}/0"
        # 0.2 s falls back well within 5 s; 30 s is still waiting after 2 s, where the default 0.5 s would not be.
        for timeout_s, wait_s, answered in ((0.2, 5.0, True), (30.0, 2.0, False)):
            settings = GatewaySettings(router_address="127.0.0.1:1", redis_url=url, redis_timeout_s=timeout_s)
            backend = limit_backend(settings)
            task = asyncio.ensure_future(backend.take([(RPS, 1)]))
            try:
                done, _ = await asyncio.wait({task}, timeout=wait_s)
                assert bool(done) is answered, timeout_s
                if answered:
                    assert task.result() == []  # admitted by the fallback
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await backend.close()


@contextlib.contextmanager
def gateway_process(tmp: Path, name: str, router: str, *flags: str):
    """A gateway as its own process (`python -m services.gateway`) with these flags, its address in the ready
    file; stopped with SIGTERM (killed if it lingers) when the block ends, unless it died already."""
    ready = tmp / f"{name}.json"
    log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.gateway",
            f"--router-address={router}",
            f"--ready-file={ready}",
            "--http-port=-1",
            *flags,
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={
            **os.environ,
            "FLEETSERVE_GATEWAY_LOG_JSON": "true",
            "FLEETSERVE_GATEWAY_BOOTSTRAP_API_KEY": API_KEY,
        },
    )
    try:
        yield proc, ready
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


async def _tenants_at_4_per_s(db: str, prefix: str) -> list[str]:
    """Three tenants limited to 4 requests per second in the gateway database at db (a fresh bucket for each
    burst); their API keys."""
    store = TenantStore(await open_accounts(db))
    try:
        await store.bootstrap(API_KEY)
        keys = []
        for n in range(3):
            await store.create_tenant(f"{prefix}{n}", tenant_id=f"{prefix}{n}")
            await store.set_tenant(f"{prefix}{n}", rps=4)
            keys.append(await store.add_key(f"{prefix}{n}"))
        return keys
    finally:
        await store.close()


async def _serving_stubs(fleet, addresses: list[str], key: str) -> list:
    """A stub per gateway, each connected and serving (one ListModels answered), so a burst is simultaneous."""
    stubs = [pb_grpc.InferenceServiceStub(fleet.channel(a)) for a in addresses]
    for stub in stubs:
        await stub.ListModels(
            pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {key}"),), timeout=10
        )
    return stubs


async def _one_request(stub, key: str) -> str:
    """One 1-token request: "OK", or the reason it was refused (a refusal always says when to retry)."""
    call = stub.Generate(
        pb.GenerateRequest(model=MODEL, prompt="hi", max_tokens=1),
        metadata=(("authorization", f"Bearer {key}"),),
        timeout=20,
    )
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as e:
        d = details_of(e)
        assert d.retry_after_s and d.retry_after_s > 0, (e.code(), e.details())
        return d.reason
    return "OK"


async def test_two_gateway_processes_enforce_a_tenant_limit_once(redis_url, tmp_path):
    """Two gateway processes sharing one Redis: 10 simultaneous requests of a tenant limited to 4 per second,
    5 through each, admit 4 plus what drained (4/s) while they arrived by Redis's clock, not the 8 two separate
    limiters would; neither gateway fell back to its in-process share."""
    async with in_process_fleet(tmp_path, engines=1) as fleet:
        db = str(tmp_path / "gateway.db")
        keys = await _tenants_at_4_per_s(db, "shared")
        # A Redis call slower than --redis-timeout-s counts as Redis unreachable and that request is checked
        # against the in-process fallback (test_redis_breaker.py): on a loaded 2-core box 0.5 s (the default)
        # was exceeded ("Timeout connecting to server"); here Redis is up and the limit must hold once.
        flags = (
            f"--db-path={db}",
            f"--redis-url={redis_url}",
            "--auth-cache-ttl-s=0",
            "--redis-timeout-s=10",
        )
        with (
            gateway_process(tmp_path, "gw1", fleet.router.address, *flags) as (p1, r1),
            gateway_process(tmp_path, "gw2", fleet.router.address, *flags) as (p2, r2),
        ):
            addresses = [
                await assert_eventually(lambda r=r: ready_address(r), timeout_s=60) for r in (r1, r2)
            ]
            stubs = await _serving_stubs(fleet, addresses, keys[0])

            clock = redis.from_url(redis_url)
            try:
                # A burst that spreads over a second (a loaded box) cannot tell one limiter from two: another
                # burst, of another tenant, at most 3 in all.
                for n, key in enumerate(keys):
                    start = await _redis_now(clock)
                    results = await asyncio.gather(*(_one_request(stubs[i % 2], key) for i in range(10)))
                    # The bucket's `at`: Redis's time of the last admission; if it expired (2 s after), now.
                    at = await clock.hget(f"fleetserve:gw:t:shared{n}:rps", "at")
                    spread = (float(at) if at is not None else await _redis_now(clock)) - start
                    admitted = results.count("OK")
                    # A 4/s bucket of 4 admits at most 4 + 4/s x the time from the first to the last admission:
                    # on a loaded box a burst spread over ~0.75 s admitted 6, exactly that bound.
                    assert 4 <= admitted <= 4 + int(4 * spread), (results, spread)
                    assert set(results) <= {"OK", "RATE_LIMITED"}
                    if spread < 1.0:
                        break
            finally:
                await clock.aclose()
            assert spread < 1.0, f"3 bursts each spread over a second ({spread:.2f} s the last)"
            assert p1.poll() is None and p2.poll() is None
        fallbacks = [
            line
            for n in ("gw1", "gw2")
            for line in (tmp_path / f"{n}.log").read_text().splitlines()
            if "gateway.redis_unavailable" in line
        ]
        assert not fallbacks, fallbacks


def _log_events(path: Path, event: str) -> list[dict]:
    """The JSON log lines of a gateway process that have this event."""
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if record.get("event") == event:
                out.append(record)
    return out


async def test_two_gateways_started_while_redis_is_down_enforce_a_tenant_limit_once(tmp_path):
    """Two gateway processes started with their Redis down (they never saw each other there) on one gateway
    database: they count each other in its presence table, so 10 simultaneous requests of a tenant limited to
    4 per second, 5 through each, admit 4 plus what drained (4/s) during the burst: each its half, not the whole
    limit each (8, what they admitted when the fleet size was only learned in Redis)."""
    async with in_process_fleet(tmp_path, engines=1) as fleet:
        db = str(tmp_path / "gateway.db")
        keys = await _tenants_at_4_per_s(db, "down")
        flags = (
            f"--db-path={db}",
            f"--redis-url=redis://{closed_port_address()}/0",  # refused: Redis down from the start
            "--auth-cache-ttl-s=0",
        )
        with (
            gateway_process(tmp_path, "gw1", fleet.router.address, *flags) as (p1, r1),
            gateway_process(tmp_path, "gw2", fleet.router.address, *flags) as (p2, r2),
        ):
            addresses = [
                await assert_eventually(lambda r=r: ready_address(r), timeout_s=60) for r in (r1, r2)
            ]
            # Each has read the other's presence lease in the database (rounds every second).
            for name in ("gw1", "gw2"):
                await assert_eventually(
                    lambda name=name: any(
                        e["gateways"] == 2 and e["source"] == "seen"
                        for e in _log_events(tmp_path / f"{name}.log", "gateway.limits_fleet_size")
                    ),
                    timeout_s=30,
                    message=f"{name} did not count 2 gateways",
                )
            stubs = await _serving_stubs(fleet, addresses, keys[0])

            # A burst that spreads over a second (a loaded box) cannot tell one limiter from two: another burst,
            # of another tenant, at most 3 in all. Without Redis there is no shared clock: the spread is this
            # process's time from the first send to the last answer, which only loosens the bound.
            for key in keys:
                start = time.monotonic()
                results = await asyncio.gather(*(_one_request(stubs[i % 2], key) for i in range(10)))
                spread = time.monotonic() - start
                admitted = results.count("OK")
                assert set(results) <= {"OK", "RATE_LIMITED"}, results
                # Each gateway's half of the bucket: 2 + 2/s x spread each, 4 + 4/s x spread together.
                assert 4 <= admitted <= 4 + int(4 * spread), (results, spread)
                if spread < 1.0:
                    break
            assert spread < 1.0, f"3 bursts each spread over a second ({spread:.2f} s the last)"
            assert p1.poll() is None and p2.poll() is None

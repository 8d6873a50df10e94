"""A gateway whose Redis (shared limits) hangs under load: once the breaker opens, requests stop waiting for
Redis and every request still gets an answer (served, or refused by the in-process limits with RetryInfo); the
breaker closes once Redis answers again. Records the request latency before the outage, during it (after the
breaker opened) and after, for docs/benchmarks/reliability.md (no timed assertion here)."""

from __future__ import annotations

import time

import grpc
import pytest
from fleetserve.inference.v1 import inference_service_pb2 as pb
from fleetserve.inference.v1 import inference_service_pb2_grpc as pb_grpc

from services.gateway.app import start as start_gateway
from services.gateway.config import GatewaySettings
from services.gateway.schema import open_accounts
from services.gateway.tenants import TenantStore
from shared.errors import details_of
from shared.resilience import BreakerState
from tests.chaos.report import percentile, record
from tests.integration.test_router import API_KEY, MODEL, in_process_fleet
from tests.support import assert_eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

N = 60


async def _requests(stub, key: str, n: int) -> tuple[list[float], dict[str, int]]:
    latencies, outcomes = [], {}
    for i in range(n):
        started = time.monotonic()
        try:
            async for _ in stub.Generate(
                pb.GenerateRequest(model=MODEL, prompt=f"r {i}", max_tokens=1),
                metadata=(("authorization", f"Bearer {key}"),),
                timeout=20,
            ):
                pass
            end = "OK"
        except grpc.aio.AioRpcError as e:
            d = details_of(e)
            assert d.code == grpc.StatusCode.RESOURCE_EXHAUSTED and d.retry_after_s, d
            end = d.reason
        latencies.append(time.monotonic() - started)
        outcomes[end] = outcomes.get(end, 0) + 1
    return latencies, outcomes


async def test_a_hung_redis_stops_costing_latency_once_the_breaker_opens(tmp_path, redis_server):
    """Redis SIGSTOPped under sequential requests: the breaker opens, every later request is answered without
    Redis; SIGCONT: the breaker closes and requests go through Redis again."""
    async with in_process_fleet(tmp_path, engines=1) as fleet:
        # A tenant with limits, so that admission goes to Redis (an unlimited tenant never does).
        store = TenantStore(await open_accounts(str(tmp_path / "gw.db")))
        await store.bootstrap(API_KEY)
        await store.create_tenant("limited", tenant_id="limited")
        await store.set_tenant("limited", rps=1000, max_streams=100)
        key = await store.add_key("limited")
        await store.close()
        gateway = await start_gateway(
            GatewaySettings(
                router_address=fleet.router.address,
                db_path=str(tmp_path / "gw.db"),
                http_port=-1,
                auth_cache_ttl_s=0.0,
                redis_url=redis_server.url,
            ),
            fleet.telemetry,
        )
        try:
            backend = gateway.servicer.pipeline.admission.backend
            stub = pb_grpc.InferenceServiceStub(fleet.channel(gateway.address))
            before, _ = await _requests(stub, key, N)
            redis_server.hang()
            try:
                opening, _ = await _requests(
                    stub, key, 3
                )  # each pays the socket timeout until the breaker opens
                await assert_eventually(lambda: backend.breaker.state is BreakerState.OPEN, timeout_s=30)
                during, outcomes = await _requests(stub, key, N)
                assert backend.breaker.state is not BreakerState.CLOSED
            finally:
                redis_server.resume()
            await assert_eventually(lambda: backend.breaker.current() is BreakerState.CLOSED, timeout_s=30)
            after, _ = await _requests(stub, key, N)
        finally:
            await gateway.stop(0.5)
    p50 = {
        k: percentile(v, 50)
        for k, v in (("before", before), ("opening", opening), ("during", during), ("after", after))
    }
    print(f"redis hung: latency p50 {p50}, outcomes during {outcomes}")
    record(
        "redis_hung_one_gateway", requests=3 * N + 3, latency_p50_s=p50, outcomes_during=outcomes, failed=0
    )

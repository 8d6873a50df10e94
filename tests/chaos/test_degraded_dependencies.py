"""Degraded, not dead: a replica ten times slower than its peers, then the registry killed, under load. The slow
replica serves correctly and is not mistaken for a hung one (its stall threshold follows its own pace); with the
registry gone the router keeps routing on the membership it last saw. Zero failed requests, every stream
token-identical to an undisturbed run, nothing left in flight afterwards."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest
from fleetserve.inference.v1 import inference_service_pb2_grpc as inf_grpc

from tests.chaos.invariants import busy_counts, log_problems
from tests.chaos.report import record
from tests.chaos.test_replica_kills import SPECS, Outcome, run_one
from tests.integration.conftest import running_cluster
from tests.support import assert_eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PHASE_S = 5.0
CLIENTS = 6


async def _load(stub, key: str, seconds: float) -> list[Outcome]:
    outcomes: list[Outcome] = []
    end = time.monotonic() + seconds

    async def client(n: int) -> None:
        i = n
        while time.monotonic() < end:
            outcomes.append(await run_one(stub, key, i % len(SPECS)))
            i += CLIENTS

    await asyncio.gather(*(client(n) for n in range(CLIENTS)))
    return outcomes


def _check(outcomes: list[Outcome], reference: list[Outcome]) -> None:
    failed = [o.error for o in outcomes if o.error]
    assert not failed, f"{len(failed)} of {len(outcomes)} failed: {failed[:5]}"
    for o in outcomes:
        assert o.ids == reference[o.spec].ids, f"spec {o.spec}: tokens differ from the undisturbed run"


async def test_slow_replica_then_registry_down(tmp_path):
    """Phase 1: a third engine with every step 10x slower joins; load for PHASE_S. Phase 2: the registry is
    SIGKILLed; load for PHASE_S. No failures, identical tokens; the slow engine served requests."""
    async with running_cluster(tmp_path, engines=2) as cluster:
        slow = await cluster.add_engine(args=["--sim-behaviour", "*:slowdown=10"])
        async with grpc.aio.insecure_channel(cluster.gateway) as ch:
            stub = inf_grpc.InferenceServiceStub(ch)
            key = cluster.api_key
            await assert_eventually(lambda: _routable(cluster, 3), timeout_s=30, interval_s=0.2)
            reference = await asyncio.gather(*(run_one(stub, key, i) for i in range(len(SPECS))))
            assert all(not r.error for r in reference), [r.error for r in reference if r.error]

            slow_phase = await _load(stub, key, PHASE_S)
            _check(slow_phase, reference)
            served_by_slow = sum(o.served_by == [slow] for o in slow_phase)
            assert served_by_slow > 0, "the slow replica took no request"

            cluster.signal("registry", signal.SIGKILL)
            assert await cluster.wait_exit("registry", 10) != 0
            registry_down = await _load(stub, key, PHASE_S)
            _check(registry_down, reference)

            async def idle():
                counts = await busy_counts(cluster)
                return not any(counts.values()) and counts

            await assert_eventually(idle, timeout_s=30, interval_s=0.2)
    router_log = (tmp_path / "logs" / "router.log").read_text(errors="replace").splitlines()
    false_stalls = sum('"router.replica_stalled"' in line and slow in line for line in router_log)
    print(
        f"slow replica: {len(slow_phase)} requests ({served_by_slow} on the slow one, {false_stalls} stall "
        f"reports for it); registry down: {len(registry_down)} requests"
    )
    record(
        "slow_replica",
        requests=len(slow_phase),
        failed=0,
        served_by_slow=served_by_slow,
        stall_reports_for_slow=false_stalls,
        lost_or_duplicated_tokens=0,
    )
    record("registry_down", requests=len(registry_down), failed=0, lost_or_duplicated_tokens=0)
    assert log_problems(tmp_path / "logs") == []


async def _routable(cluster, n: int) -> bool:
    from fleetserve.router.v1 import router_service_pb2 as router_pb
    from fleetserve.router.v1 import router_service_pb2_grpc as router_grpc

    async with grpc.aio.insecure_channel(cluster.router) as ch:
        status = await router_grpc.RouterServiceStub(ch).GetStatus(router_pb.GetStatusRequest(), timeout=5)
    return sum(r.routable for r in status.replicas) == n

"""The registry is not a single point of failure: two registry processes over a real three-member etcd cluster
serve the same membership, and one registry and then the etcd member it talks to can be SIGKILLed without
losing a replica or a request (and both registries measure cold starts); with every registry down, routers keep
routing on their last snapshot."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest
from fleetserve.inference.v1 import inference_service_pb2 as inf_pb
from fleetserve.inference.v1 import inference_service_pb2_grpc as inf_grpc
from fleetserve.registry.v1 import registry_service_pb2 as reg_pb
from fleetserve.registry.v1 import registry_service_pb2_grpc as reg_grpc

from tests.integration.conftest import running_cluster
from tests.support import assert_eventually

pytestmark = pytest.mark.slow


async def listed(address: str) -> dict[str, reg_pb.Replica]:
    async with grpc.aio.insecure_channel(address) as ch:
        resp = await reg_grpc.RegistryServiceStub(ch).ListReplicas(reg_pb.ListReplicasRequest(), timeout=2)
    return {r.replica_id: r for r in resp.replicas}


async def load_loop(cluster, stop: asyncio.Event, outcomes: list[str]) -> None:
    """Requests through the gateway one after another until stop is set; each outcome appended."""
    async with grpc.aio.insecure_channel(cluster.gateway) as ch:
        stub = inf_grpc.InferenceServiceStub(ch)
        for _ in range(10_000):  # bounded; the test sets stop long before
            if stop.is_set():
                return
            req = inf_pb.GenerateRequest(model="sim-1b", prompt="ha", max_tokens=8, ignore_eos=True)
            try:
                chunks = [
                    r.chunk
                    async for r in stub.Generate(
                        req, metadata=(("authorization", f"Bearer {cluster.api_key}"),), timeout=20
                    )
                ]
                outcomes.append("ok" if chunks and chunks[-1].usage.completion_tokens == 8 else "short")
            except grpc.aio.AioRpcError as e:
                outcomes.append(e.code().name)


async def watch_removals(address: str, removed: list[str], ready: asyncio.Event) -> None:
    """Record every replica a watch on one registry reports REMOVED."""
    async with grpc.aio.insecure_channel(address) as ch:
        call = reg_grpc.RegistryServiceStub(ch).WatchReplicas(reg_pb.WatchReplicasRequest(), timeout=120)
        async for ev in call:
            ready.set()
            if ev.type == reg_pb.WATCH_EVENT_TYPE_REMOVED:
                removed.extend(r.replica_id for r in ev.replicas)


async def test_two_registries_over_an_etcd_cluster_survive_a_registry_and_a_member_killed(
    tmp_path, etcd_cluster
):
    """Engines registered through either registry are listed by both; after one registry is SIGKILLed the
    other keeps every replica (no REMOVED) and engines heartbeat through it; after the etcd member it talks to
    is SIGKILLed too, it moves to another member and still keeps every replica and heartbeat; requests never
    fail, not even once the second registry is killed too (routers route on their last snapshot)."""
    async with running_cluster(
        tmp_path,
        engines=2,
        registry_store="etcd",
        etcd_endpoint=etcd_cluster.endpoint,  # every member: a,b,c
        registries=2,
        lease_ttl_s=2.0,
        heartbeat_interval_s=0.3,
        engine_startup_s=5.0,  # 1 s at speed 5: the cold start the registry measures
    ) as cluster:
        a, b = (cluster.procs[n].address for n in cluster.registry_names())
        engines = set(cluster.engine_names())
        await assert_eventually(lambda: _lists(a, engines), timeout_s=20)
        await assert_eventually(lambda: _lists(b, engines), timeout_s=20)
        for rep in (await listed(b)).values():
            # Process start (reported by the engine) to first registration (stamped by a registry).
            assert rep.started_unix > 0 and rep.registered_unix - rep.started_unix >= 1.0

        removed: list[str] = []
        watching = asyncio.Event()
        watcher = asyncio.create_task(watch_removals(b, removed, watching))
        stop, outcomes = asyncio.Event(), []
        load = asyncio.create_task(load_loop(cluster, stop, outcomes))
        try:
            await asyncio.wait_for(watching.wait(), 10)
            await assert_eventually(lambda: len(outcomes) >= 5, timeout_s=30)
            cluster.signal("registry", signal.SIGKILL)
            await cluster.wait_exit("registry", 10)
            before = {rid: r.last_heartbeat_unix for rid, r in (await listed(b)).items()}
            # Heartbeats now reach the survivor: every engine's last heartbeat moves on there.
            await assert_eventually(lambda: _heartbeats_after(b, before), timeout_s=20)
            # The etcd member the survivor talks to (the first it was given) dies: it moves to another.
            etcd_cluster.kill(0)
            before = {rid: r.last_heartbeat_unix for rid, r in (await listed(b)).items()}
            await assert_eventually(lambda: _heartbeats_after(b, before), timeout_s=30)
            log = (cluster.config.data_dir / "logs" / "registry-2.log").read_text()
            assert "registry.etcd_failover" in log  # it did move (it was on the killed member)
            # Two lease lengths later nothing was lost.
            await asyncio.sleep(2 * 2.0)  # a window to observe an expiry that must not happen
            assert set(await listed(b)) == engines
            n = len(outcomes)
            await assert_eventually(lambda: len(outcomes) >= n + 5, timeout_s=30)
            # Now no registry at all: the router keeps routing on its last snapshot (past the lease TTL).
            cluster.signal("registry-2", signal.SIGKILL)
            await cluster.wait_exit("registry-2", 10)
            await asyncio.sleep(3.0)
            n = len(outcomes)
            await assert_eventually(lambda: len(outcomes) >= n + 5, timeout_s=30)
        finally:
            stop.set()
            await load
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        assert removed == [], f"the survivor reported replicas removed: {removed}"
        assert outcomes and set(outcomes) == {"ok"}, f"outcomes: {sorted(set(outcomes))}"


async def _lists(address: str, engines: set[str]) -> bool:
    return set(await listed(address)) == engines


async def _heartbeats_after(address: str, before: dict[str, float]) -> bool:
    now = await listed(address)
    return set(now) == set(before) and all(now[r].last_heartbeat_unix > before[r] for r in before)

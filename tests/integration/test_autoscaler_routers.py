"""The autoscaler's routers with --router-discovery: those registered in the registry are polled for their
arrivals under their registry id, a router that comes back on a new port is followed there, and a registered
router also given by address is polled once."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
from fleetserve.common.v1 import common_pb2
from fleetserve.router.v1 import router_service_pb2 as router_pb
from fleetserve.router.v1 import router_service_pb2_grpc as router_grpc

from services.autoscaler import app as autoscaler_app
from services.autoscaler.config import AutoscalerSettings
from services.autoscaler.router_directory import RouterDirectory
from services.engine.app import start as start_engine
from services.engine.config import EngineSettings
from services.registry.app import start as start_registry
from services.registry.config import RegistrySettings
from services.router.app import start as start_router
from services.router.config import RouterSettings
from shared.channels import open_channel
from shared.telemetry import setup_telemetry
from tests.support import assert_eventually

MODEL = "sim-1b"


async def generate(address: str, n: int) -> None:
    """n requests through the router at address, each completed."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = router_grpc.RouterServiceStub(ch)
        for i in range(n):
            req = router_pb.GenerateRequest(
                request_id=f"arrival-{address}-{i}",
                spec=common_pb2.GenerationSpec(
                    model=MODEL,
                    prompt="hi",
                    sampling=common_pb2.SamplingParams(max_tokens=2, ignore_eos=True),
                ),
            )
            chunks = [r.chunk async for r in stub.Generate(req, timeout=10)]
            assert chunks[-1].usage.completion_tokens == 2


async def registry_at(tmp_path: Path):
    return await start_registry(
        RegistrySettings(db_path=str(tmp_path / "registry.db"), lease_ttl_s=2.0, heartbeat_interval_s=0.2),
        setup_telemetry("registry"),
    )


async def engine_1(registry_address: str):
    """engine-1 of MODEL (a fast sim), registered with the registry at registry_address."""
    return await start_engine(
        EngineSettings(
            registry_address=registry_address, replica_id="engine-1", model=MODEL, speed_factor=20
        ),
        setup_telemetry("engine"),
    )


def discovering(registry_address: str) -> AutoscalerSettings:
    """An autoscaler that finds its routers in the registry and starts no engine (external provisioner); its
    first round runs at start, the tests run the others."""
    return AutoscalerSettings(
        registry_address=registry_address,
        router_discovery=True,
        provisioner="external",
        models=json.dumps({MODEL: {"min_replicas": 1, "max_replicas": 1}}),
        interval_s=3600,
    )


async def router_r1(registry_address: str):
    """A router registered as r1 (on a free port each start)."""
    return await start_router(
        RouterSettings(registry_address=registry_address, router_id="r1"), setup_telemetry("router")
    )


def arrivals(counts: dict, key: str) -> int:
    return sum(n for (model, _), n in counts.get(key, {}).items() if model == MODEL)


async def test_registered_routers_are_polled_by_registry_id_and_followed_to_a_new_port(tmp_path: Path):
    apps = []
    try:
        registry = await registry_at(tmp_path)
        apps.append(registry)
        engine = await engine_1(registry.address)
        apps.append(engine)
        router = await router_r1(registry.address)
        apps.append(router)
        scaling = await autoscaler_app.start(discovering(registry.address), setup_telemetry("autoscaler"))
        apps.append(scaling)
        scaler = scaling.autoscaler
        assert scaler.routers.any  # no router given by address: arrivals still come from routers

        await assert_eventually(lambda: _routable(router), timeout_s=10)
        await generate(router.address, 3)

        async def counted(key: str, n: int) -> bool:
            return arrivals((await scaler._routers()).counts, key) == n

        await assert_eventually(lambda: counted("id:r1", 3), timeout_s=10)
        first = router.address
        # The same router id back on a new port (a restarted gateway worker's embedded router): polled there.
        await router.stop(0.5)
        apps.remove(router)
        router = await router_r1(registry.address)
        apps.append(router)
        assert router.address != first
        await assert_eventually(lambda: _routable(router), timeout_s=10)
        await generate(router.address, 2)
        await assert_eventually(lambda: counted("id:r1", 2), timeout_s=10)  # the new process's own counter
        assert scaler.routers.found == [router.address]  # the old port's channel closed
    finally:
        for app in reversed(apps):
            await app.stop(0.5)


async def test_a_router_restarted_on_its_id_that_counts_past_its_predecessor_is_counted_whole(tmp_path: Path):
    """r1 counts 5 requests, then is restarted (same id, new process) and counts 6 before the autoscaler's next
    round: the round counts all 6 (its GetStatus incarnation changed), not 6 - 5 = 1 as a restart told only by
    a lower count would."""
    apps = []
    try:
        registry = await registry_at(tmp_path)
        apps.append(registry)
        engine = await engine_1(registry.address)
        apps.append(engine)
        router = await router_r1(registry.address)
        apps.append(router)
        scaling = await autoscaler_app.start(discovering(registry.address), setup_telemetry("autoscaler"))
        apps.append(scaling)
        scaler = scaling.autoscaler
        await assert_eventually(lambda: _routable(router), timeout_s=10)
        await assert_eventually(lambda: _keys(scaler.routers, ["id:r1"]), timeout_s=10)
        await scaler.tick()  # r1's counters at 0: the baseline
        base = scaler.arrivals.total(MODEL)
        await generate(router.address, 5)
        await scaler.tick()
        assert scaler.arrivals.total(MODEL) - base == 5
        first = (await scaler._routers()).incarnations["id:r1"]
        await router.stop(0.5)
        apps.remove(router)
        router = await router_r1(registry.address)
        apps.append(router)
        await assert_eventually(lambda: _routable(router), timeout_s=10)
        await generate(router.address, 6)
        await scaler.tick()
        assert scaler.arrivals.total(MODEL) - base == 11
        assert (await scaler._routers()).incarnations["id:r1"] not in ("", first)
    finally:
        for app in reversed(apps):
            await app.stop(0.5)


async def test_a_registered_router_given_by_address_too_is_polled_once_and_nothing_without_discovery(
    tmp_path: Path,
):
    apps = []
    registry_ch = None
    try:
        registry = await registry_at(tmp_path)
        apps.append(registry)
        router = await router_r1(registry.address)
        apps.append(router)
        registry_ch = open_channel(registry.address)
        both = RouterDirectory([router.address], registry_ch, discovery=True)
        found = RouterDirectory([], registry_ch, discovery=True)
        neither = RouterDirectory([], registry_ch)
        await assert_eventually(lambda: _keys(found, ["id:r1"]), timeout_s=10)
        assert [k for k, _ in await both.routers(3.0)] == [router.address]
        assert await neither.routers(3.0) == [] and not neither.any
        for d in (both, found, neither):
            await d.close()
    finally:
        if registry_ch is not None:
            await registry_ch.close()
        for app in reversed(apps):
            await app.stop(0.5)


async def _keys(directory: RouterDirectory, want: list[str]) -> bool:
    return [k for k, _ in await directory.routers(3.0)] == want


async def _routable(router) -> bool:
    return len(router.membership.routable(MODEL)) == 1

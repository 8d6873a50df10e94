"""The autoscaler follows the registry's traffic configuration over one long-lived WatchTraffic stream: many
rounds open one stream at the registry (not one each), a rollout started later reaches it through that stream,
and when the registry comes back after going away the watch reconnects."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import structlog
from fleetserve.registry.v1 import registry_service_pb2 as reg_pb
from fleetserve.registry.v1 import registry_service_pb2_grpc as reg_grpc
from fleetserve.registry.v1 import rollout_service_pb2 as rpb
from fleetserve.registry.v1 import rollout_service_pb2_grpc as rollout_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider

from services.autoscaler import app as autoscaler_app
from services.autoscaler.config import AutoscalerSettings
from services.registry import app as registry_app
from services.registry.config import RegistrySettings
from shared.telemetry import Telemetry
from tests.support import assert_eventually

MODELS = {
    "m": {
        "min_replicas": 0,
        "scale_to_zero": True,
        "max_replicas": 2,
        "version": "v1",
        "versions": {"v2": {}},
    }
}


def telemetry() -> Telemetry:
    tp, mp = TracerProvider(), MeterProvider()
    return Telemetry(tp.get_tracer("t"), mp.get_meter("t"), tp, mp)


async def start_registry(tmp: Path, port: int = 0) -> registry_app.RegistryApp:
    settings = RegistrySettings(
        port=port, db_path=str(tmp / "registry.db"), lease_ttl_s=30, heartbeat_interval_s=1
    )
    return await registry_app.start(settings, telemetry())


async def start_autoscaler(registry_address: str) -> autoscaler_app.AutoscalerApp:
    settings = AutoscalerSettings(
        registry_address=registry_address,
        provisioner="external",
        models=json.dumps(MODELS),
        interval_s=0.05,
        watch_backoff_base_s=0.05,
        watch_backoff_max_s=0.2,
    )
    return await autoscaler_app.start(settings, telemetry())


async def start_rollout(address: str) -> None:
    """Two registered versions of m, and a canary of v2 over v1."""
    async with grpc.aio.insecure_channel(address) as ch:
        reg = reg_grpc.RegistryServiceStub(ch)
        for rid, version in (("a", "v1"), ("b", "v2")):
            replica = reg_pb.Replica(replica_id=rid, address=f"127.0.0.1:{9000 + len(rid)}", model="m")
            replica.model_version = version
            await reg.RegisterReplica(reg_pb.RegisterReplicaRequest(replica=replica), timeout=5)
        plan = rpb.RolloutPlan(
            model="m",
            baseline_version="v1",
            candidate_version="v2",
            strategy=rpb.ROLLOUT_STRATEGY_CANARY,
            steps=[10],
        )
        await rollout_grpc.RolloutServiceStub(ch).StartRollout(rpb.StartRolloutRequest(plan=plan), timeout=5)


def watch_starts(logs: list[dict]) -> int:
    return sum(1 for e in logs if e["event"] == "registry.traffic_watch_started")


async def test_rounds_share_one_traffic_watch_that_delivers_changes(tmp_path):
    """Twenty rounds (0.05 s apart) open one WatchTraffic stream at the registry, not one per round; a rollout
    started afterwards reaches the autoscaler on that same stream."""
    with structlog.testing.capture_logs() as logs:
        registry = await start_registry(tmp_path)
        try:
            scaler = await start_autoscaler(registry.address)
            try:
                await assert_eventually(lambda: scaler.autoscaler.ticks >= 20, timeout_s=30)
                assert watch_starts(logs) == 1
                assert registry.rollouts.traffic.watcher_count == 1
                await start_rollout(registry.address)
                await assert_eventually(
                    lambda: (
                        scaler.autoscaler.traffic is not None
                        and [r.plan.candidate_version for r in scaler.autoscaler.traffic.rollouts] == ["v2"]
                    ),
                    timeout_s=10,
                )
                ticks = scaler.autoscaler.ticks
                await assert_eventually(lambda: scaler.autoscaler.ticks >= ticks + 5, timeout_s=30)
                assert watch_starts(logs) == 1
            finally:
                await scaler.stop(0)
        finally:
            await registry.stop(0)


async def test_traffic_watch_reconnects_when_the_registry_is_back(tmp_path):
    """With the registry gone the autoscaler keeps its last configuration; a registry back on the same address
    (same database) gets one new watch, and a change made there reaches the autoscaler."""
    with structlog.testing.capture_logs() as logs:
        registry = await start_registry(tmp_path)
        port = int(registry.address.rsplit(":", 1)[1])
        scaler = await start_autoscaler(registry.address)
        try:
            await assert_eventually(lambda: scaler.autoscaler.connected, timeout_s=10)
            await registry.stop(0)
            await assert_eventually(lambda: not scaler.autoscaler.connected, timeout_s=10)
            assert scaler.autoscaler.traffic is not None  # kept while the registry is away
            registry = await start_registry(tmp_path, port)
            await assert_eventually(lambda: scaler.autoscaler.connected, timeout_s=10)
            await start_rollout(registry.address)
            await assert_eventually(
                lambda: [r.plan.candidate_version for r in scaler.autoscaler.traffic.rollouts] == ["v2"],
                timeout_s=10,
            )
            assert watch_starts(logs) == 2
        finally:
            await scaler.stop(0)
            await registry.stop(0)

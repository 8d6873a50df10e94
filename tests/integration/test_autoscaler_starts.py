"""The autoscaler never starts more replicas than it wants: a replica registered by someone else (the launcher's
engine) and the engines it started that are still cold starting count toward the desired count in every round,
and an engine stuck cold starting past --start-timeout-s is stopped and replaced rather than held for ever."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
from fleetserve.registry.v1 import registry_service_pb2 as reg_pb
from fleetserve.registry.v1 import registry_service_pb2_grpc as reg_grpc

from services.autoscaler import app as autoscaler_app
from services.autoscaler.config import AutoscalerSettings
from shared.telemetry import setup_telemetry
from tests.integration.test_autoscaler_routers import MODEL, engine_1, registry_at
from tests.support import assert_eventually


async def serving(registry_address: str) -> set[str]:
    async with grpc.aio.insecure_channel(registry_address) as ch:
        resp = await reg_grpc.RegistryServiceStub(ch).ListReplicas(
            reg_pb.ListReplicasRequest(model=MODEL), timeout=3
        )
    return {r.replica_id for r in resp.replicas if r.state == reg_pb.REPLICA_STATE_SERVING}


def started(tmp_path: Path) -> list[str]:
    """The engines the local provisioner started (each gets a log file named by its replica id)."""
    return sorted(p.stem for p in (tmp_path / "logs").glob(f"{MODEL}-*.log"))


def autoscaler_settings(registry_address: str, tmp_path: Path, models: dict, **kw) -> AutoscalerSettings:
    return AutoscalerSettings(
        registry_address=registry_address,
        provisioner="local",
        data_dir=str(tmp_path),
        models=json.dumps(models),
        **{"interval_s": 0.2, "grace_period_s": 0.5, **kw},
    )


async def test_registered_and_cold_starting_replicas_count_so_rounds_start_none_beyond_min(tmp_path: Path):
    """min_replicas 2 with one engine already registered (not the autoscaler's): the first round starts one, and
    the rounds while that one cold starts (3 s, before it registers) start none; the fleet ends at exactly 2."""
    apps = []
    try:
        registry = await registry_at(tmp_path)
        apps.append(registry)
        engine = await engine_1(registry.address)
        apps.append(engine)
        await assert_eventually(lambda: _equals(registry.address, {"engine-1"}), timeout_s=10)
        scaling = await autoscaler_app.start(
            autoscaler_settings(
                registry.address,
                tmp_path,
                {MODEL: {"min_replicas": 2, "max_replicas": 4}},
                engine_args="--speed-factor 1 --startup-s 3",
            ),
            setup_telemetry("autoscaler"),
        )
        apps.append(scaling)
        scaler = scaling.autoscaler
        await assert_eventually(lambda: len(started(tmp_path)) >= 1, timeout_s=10)
        first = scaler.ticks
        # Rounds run while its engine is still cold starting (not registered): none of them starts another.
        await assert_eventually(lambda: scaler.ticks >= first + 5, timeout_s=10)
        assert len(await serving(registry.address)) == 1, (
            "the started engine registered too soon for this test"
        )
        assert len(started(tmp_path)) == 1
        assert scaler.last[MODEL].starting == 1 and scaler.last[MODEL].serving == 1
        await assert_eventually(lambda: _count(registry.address, 2), timeout_s=30)
        at = scaler.ticks
        await assert_eventually(lambda: scaler.ticks >= at + 5, timeout_s=10)
        assert len(started(tmp_path)) == 1
        assert await serving(registry.address) == {"engine-1", *started(tmp_path)}
        assert scaler.last[MODEL].desired == 2 and scaler.last[MODEL].starting == 0
    finally:
        for app in reversed(apps):
            await app.stop(0.5)


async def test_an_engine_stuck_cold_starting_is_stopped_after_the_start_timeout_and_replaced(tmp_path: Path):
    """An engine that never registers (a 10-minute cold start) holds its place only for --start-timeout-s: then
    it is stopped (its process ends) and another is started in its place, one at a time."""
    apps = []
    try:
        registry = await registry_at(tmp_path)
        apps.append(registry)
        scaling = await autoscaler_app.start(
            autoscaler_settings(
                registry.address,
                tmp_path,
                {MODEL: {"min_replicas": 1, "max_replicas": 2}},
                engine_args="--speed-factor 1 --startup-s 600",
                start_timeout_s=2.0,
            ),
            setup_telemetry("autoscaler"),
        )
        apps.append(scaling)
        provisioner = scaling.provisioner
        await assert_eventually(lambda: len(started(tmp_path)) >= 1, timeout_s=10)
        first = provisioner.owned(MODEL)[0]
        await assert_eventually(lambda: len(started(tmp_path)) >= 2, timeout_s=15)
        assert len(started(tmp_path)) == 2  # one replacement, not one per round
        await assert_eventually(lambda: first.process.poll() is not None, timeout_s=15)
        active = [o for o in provisioner.owned(MODEL) if not o.draining]
        assert len(active) == 1 and active[0].replica_id != first.replica_id
        assert await serving(registry.address) == set()
    finally:
        for app in reversed(apps):
            await app.stop(0.5)


async def _equals(address: str, want: set[str]) -> bool:
    return await serving(address) == want


async def _count(address: str, n: int) -> bool:
    return len(await serving(address)) == n


async def test_a_round_whose_listing_predates_its_own_drain_stops_no_second_replica(tmp_path: Path):
    """3 -> 2 replicas: the replica it drains stays SERVING in the registry until the drain's deregistration
    lands; a round that listed the replicas before that (here: the same listing, reconciled twice) does not take
    it for a replica still there and stop another."""
    apps = []
    try:
        registry = await registry_at(tmp_path)
        apps.append(registry)
        scaling = await autoscaler_app.start(
            autoscaler_settings(
                registry.address,
                tmp_path,
                {MODEL: {"min_replicas": 3, "max_replicas": 3}},
                engine_args="--speed-factor 20 --startup-s 0",
                interval_s=3600,  # one round at start (3 engines); the test reconciles by hand
            ),
            setup_telemetry("autoscaler"),
        )
        apps.append(scaling)
        scaler, provisioner = scaling.autoscaler, scaling.provisioner
        await assert_eventually(lambda: _count(registry.address, 3), timeout_s=60)
        reps = await scaler._replicas(MODEL)
        assert {r.state for r in reps} == {reg_pb.REPLICA_STATE_SERVING}
        await scaler.reconcile(MODEL, "v1", 2, reps)
        await scaler.reconcile(MODEL, "v1", 2, reps)  # the listing from before the drain
        assert len([o for o in provisioner.owned(MODEL) if o.draining]) == 1
        assert len(started(tmp_path)) == 3
    finally:
        for app in reversed(apps):
            await app.stop(0.5)

"""The registry over real channels: leases kept alive by heartbeats, expiry, watches, drain, errors, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest
from fleetserve.common.v1 import common_pb2
from fleetserve.registry.v1 import registry_service_pb2 as pb
from fleetserve.registry.v1 import registry_service_pb2_grpc as pb_grpc

from services.registry.app import start
from services.registry.config import RegistrySettings
from shared.errors import details_of
from shared.telemetry import setup_telemetry
from tests.support import assert_eventually

TTL_S = 0.6
INTERVAL_S = 0.1


def settings(db_path: str = ":memory:") -> RegistrySettings:
    return RegistrySettings(
        db_path=db_path, lease_ttl_s=TTL_S, heartbeat_interval_s=INTERVAL_S, persist_interval_s=0.2
    )


@contextlib.asynccontextmanager
async def registry(db_path: str = ":memory:"):
    """A started registry and a stub to it; stopped when the block ends."""
    app = await start(settings(db_path), setup_telemetry("registry-test"))
    try:
        async with grpc.aio.insecure_channel(app.address) as ch:
            yield app, pb_grpc.RegistryServiceStub(ch)
    finally:
        await app.stop(0.2)


def replica(rid: str, model: str = "m1", port: int = 5001) -> pb.Replica:
    return pb.Replica(replica_id=rid, address=f"127.0.0.1:{port}", model=model, backend="sim")


async def register(stub, rid: str, model: str = "m1") -> pb.RegisterReplicaResponse:
    return await stub.RegisterReplica(pb.RegisterReplicaRequest(replica=replica(rid, model)), timeout=2)


async def listed(stub, model: str = "") -> dict[str, pb.Replica]:
    resp = await stub.ListReplicas(pb.ListReplicasRequest(model=model), timeout=2)
    return {r.replica_id: r for r in resp.replicas}


async def heartbeats(stub, rid: str, count: int, interval_s: float = INTERVAL_S, running: int = 0):
    """Send count heartbeats interval_s apart on one stream; the response."""

    async def beats():
        for i in range(count):
            yield pb.HeartbeatRequest(replica_id=rid, load=common_pb2.ReplicaLoad(running=running + i))
            if i < count - 1:
                await asyncio.sleep(interval_s)

    return await stub.Heartbeat(beats(), timeout=count * interval_s + 5)


async def next_event(call, timeout_s: float = 2.0) -> pb.WatchReplicasResponse:
    return await asyncio.wait_for(call.read(), timeout_s)


async def test_register_then_list_with_lease_terms():
    """A registered replica is listed as SERVING, and the response carries the configured lease terms."""
    async with registry() as (_, stub):
        resp = await register(stub, "r1")
        assert resp.lease_ttl_s == pytest.approx(TTL_S)
        assert resp.heartbeat_interval_s == pytest.approx(INTERVAL_S)
        await register(stub, "r2", model="m2")
        got = await listed(stub)
        assert set(got) == {"r1", "r2"}
        assert got["r1"].state == pb.REPLICA_STATE_SERVING
        assert got["r1"].address == "127.0.0.1:5001"
        assert got["r1"].last_heartbeat_unix == pytest.approx(time.time(), abs=5)
        assert set(await listed(stub, model="m2")) == {"r2"}


async def test_reregistering_replaces_the_replica():
    """Registering an id again replaces the old record instead of adding a second one."""
    async with registry() as (_, stub):
        await register(stub, "r1")
        await stub.RegisterReplica(pb.RegisterReplicaRequest(replica=replica("r1", port=6000)), timeout=2)
        got = await listed(stub)
        assert list(got) == ["r1"]
        assert got["r1"].address == "127.0.0.1:6000"


async def test_watch_gets_snapshot_then_added_updated_removed():
    """A watcher first gets the membership, then ADDED on register, UPDATED with load on heartbeat and REMOVED
    on deregister."""
    async with registry() as (_, stub):
        await register(stub, "r1")
        call = stub.WatchReplicas(pb.WatchReplicasRequest(), timeout=10)
        try:
            snap = await next_event(call)
            assert snap.type == pb.WATCH_EVENT_TYPE_SNAPSHOT
            assert [r.replica_id for r in snap.replicas] == ["r1"]

            await register(stub, "r2")
            ev = await next_event(call)
            assert (ev.type, [r.replica_id for r in ev.replicas]) == (pb.WATCH_EVENT_TYPE_ADDED, ["r2"])

            await heartbeats(stub, "r2", 1, running=7)
            ev = await next_event(call)
            assert ev.type == pb.WATCH_EVENT_TYPE_UPDATED
            assert ev.replicas[0].replica_id == "r2" and ev.replicas[0].load.running == 7

            resp = await stub.DeregisterReplica(pb.DeregisterReplicaRequest(replica_id="r1"), timeout=2)
            assert resp.found
            ev = await next_event(call)
            assert (ev.type, [r.replica_id for r in ev.replicas]) == (pb.WATCH_EVENT_TYPE_REMOVED, ["r1"])
            assert set(await listed(stub)) == {"r2"}
        finally:
            call.cancel()


async def test_watch_filtered_by_model_sees_only_that_model():
    """A watch for one model gets a snapshot and events of that model's replicas only."""
    async with registry() as (_, stub):
        await register(stub, "a1", model="a")
        await register(stub, "b1", model="b")
        call = stub.WatchReplicas(pb.WatchReplicasRequest(model="b"), timeout=10)
        try:
            snap = await next_event(call)
            assert [r.replica_id for r in snap.replicas] == ["b1"]
            await register(stub, "a2", model="a")
            await register(stub, "b2", model="b")
            ev = await next_event(call)
            assert [r.replica_id for r in ev.replicas] == ["b2"]
        finally:
            call.cancel()


async def test_heartbeats_keep_a_replica_past_its_ttl():
    """A replica that heartbeats every interval is still registered well after one TTL has passed."""
    async with registry() as (_, stub):
        await register(stub, "r1")
        count = int(2 * TTL_S / INTERVAL_S)
        resp = await heartbeats(stub, "r1", count)
        assert resp.received == count
        got = await listed(stub)
        assert "r1" in got and got["r1"].load.running == count - 1


async def test_silent_replica_expires_and_watchers_see_removed():
    """A replica whose heartbeats stop is removed within ttl + reaper period, and watchers get REMOVED."""
    async with registry() as (app, stub):
        await register(stub, "r1")
        await register(stub, "r2")
        call = stub.WatchReplicas(pb.WatchReplicasRequest(), timeout=10)
        try:
            assert (await next_event(call)).type == pb.WATCH_EVENT_TYPE_SNAPSHOT
            last_beat = time.monotonic()
            keep = asyncio.create_task(heartbeats(stub, "r2", int(1.5 * TTL_S / INTERVAL_S)))
            try:
                ev = await next_event(call, timeout_s=3)
                while ev.type == pb.WATCH_EVENT_TYPE_UPDATED:  # r2's heartbeats; bounded by the read timeout
                    ev = await next_event(call, timeout_s=3)
                gone_after = time.monotonic() - last_beat
                assert (ev.type, [r.replica_id for r in ev.replicas]) == (pb.WATCH_EVENT_TYPE_REMOVED, ["r1"])
                assert TTL_S * 0.9 <= gone_after <= TTL_S + TTL_S / 4 + 0.3, gone_after
                assert set(await listed(stub)) == {"r2"}, "the heartbeating replica stays"
            finally:
                await keep
        finally:
            call.cancel()


async def test_heartbeat_for_unknown_replica_is_lease_not_found():
    """A heartbeat naming no registered replica ends the stream with NOT_FOUND, reason LEASE_NOT_FOUND."""
    async with registry() as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await heartbeats(stub, "ghost", 1)
        d = details_of(exc.value)
        assert d.code == grpc.StatusCode.NOT_FOUND
        assert d.reason == "LEASE_NOT_FOUND"


async def test_drain_marks_draining_and_keeps_it_listed():
    """Deregister with drain marks the replica DRAINING (watchers get UPDATED) and keeps it listed."""
    async with registry() as (_, stub):
        await register(stub, "r1")
        call = stub.WatchReplicas(pb.WatchReplicasRequest(), timeout=10)
        try:
            await next_event(call)
            resp = await stub.DeregisterReplica(
                pb.DeregisterReplicaRequest(replica_id="r1", drain=True), timeout=2
            )
            assert resp.found
            ev = await next_event(call)
            assert ev.type == pb.WATCH_EVENT_TYPE_UPDATED
            assert ev.replicas[0].state == pb.REPLICA_STATE_DRAINING
            await heartbeats(stub, "r1", 1)
            assert (await listed(stub))["r1"].state == pb.REPLICA_STATE_DRAINING, (
                "heartbeats do not undo a drain"
            )
        finally:
            call.cancel()


async def test_deregister_unknown_replica_is_not_found_false():
    """Deregistering an id that is not registered answers found=false."""
    async with registry() as (_, stub):
        resp = await stub.DeregisterReplica(pb.DeregisterReplicaRequest(replica_id="nope"), timeout=2)
        assert not resp.found


async def test_restart_with_same_db_keeps_replicas_and_load(tmp_path):
    """A registry restarted on the same database lists the same replicas (state and last load included) and
    gives them a fresh lease."""
    db = str(tmp_path / "registry.db")
    async with registry(db) as (_, stub):
        await register(stub, "r1")
        await register(stub, "r2", model="m2")
        await heartbeats(stub, "r1", 1, running=5)
        await stub.DeregisterReplica(pb.DeregisterReplicaRequest(replica_id="r2", drain=True), timeout=2)
    async with registry(db) as (_, stub):
        got = await listed(stub)
        assert set(got) == {"r1", "r2"}
        assert got["r1"].load.running == 5
        assert got["r2"].state == pb.REPLICA_STATE_DRAINING
        # The fresh lease still runs out without heartbeats.
        await assert_eventually(lambda: _empty(stub), timeout_s=TTL_S * 4)


async def _empty(stub) -> bool:
    return not await listed(stub)


async def test_bad_register_input_is_invalid_argument_with_field_violations():
    """Registering without an id or with a bad address is INVALID_ARGUMENT naming each field."""
    async with registry() as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.RegisterReplica(
                pb.RegisterReplicaRequest(replica=pb.Replica(replica_id="", address="")), timeout=2
            )
        d = details_of(exc.value)
        assert d.code == grpc.StatusCode.INVALID_ARGUMENT
        assert {f for f, _ in d.field_violations} == {"replica.replica_id", "replica.address"}

        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.RegisterReplica(
                pb.RegisterReplicaRequest(replica=pb.Replica(replica_id="r1", address="no-port")), timeout=2
            )
        assert [f for f, _ in details_of(exc.value).field_violations] == ["replica.address"]

        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.RegisterReplica(pb.RegisterReplicaRequest(), timeout=2)
        assert [f for f, _ in details_of(exc.value).field_violations] == ["replica"]
        assert not await listed(stub)


async def test_stop_ends_open_watches():
    """Stopping the registry ends open watch streams promptly instead of leaving them hanging."""
    app = await start(settings(), setup_telemetry("registry-test"))
    async with grpc.aio.insecure_channel(app.address) as ch:
        call = pb_grpc.RegistryServiceStub(ch).WatchReplicas(pb.WatchReplicasRequest(), timeout=10)
        await next_event(call)
        t0 = time.monotonic()
        await app.stop(5.0)
        assert time.monotonic() - t0 < 2.0
        with contextlib.suppress(grpc.aio.AioRpcError):
            assert await call.read() == grpc.aio.EOF

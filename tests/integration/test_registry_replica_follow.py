"""A registry keeps following the other registries' membership writes through etcd after its replica watch broke:
it rereads, resyncs and watches again, so a replica registered or removed while it was cut off is right once it is
back, and its /metrics count the break once and show the watch down, then up again."""

from __future__ import annotations

import asyncio
import signal

import grpc
import structlog
from fleetserve.registry.v1 import registry_service_pb2 as pb
from fleetserve.registry.v1 import registry_service_pb2_grpc as pb_grpc

from services.registry import app as registry_app
from tests.integration.etcd_registry import on_one_member, start_registry
from tests.support import assert_eventually

PREFIX = "/replica-follow/"
# Nothing heartbeats here: etcd must not expire the test's replicas before it ends.
LEASE_TTL_S = 120
BREAKS, UP = "fleetserve:registry_replica_watch_breaks_total", "fleetserve:registry_replica_watch_up"


def watch_metrics(app: registry_app.RegistryApp) -> tuple[float | None, float | None]:
    """(breaks, up) of the replica watch, as the registry's /metrics serves them."""
    return app.metrics_registry.get_sample_value(BREAKS), app.metrics_registry.get_sample_value(UP)


async def listed(channel: grpc.aio.Channel) -> set[str]:
    resp = await pb_grpc.RegistryServiceStub(channel).ListReplicas(pb.ListReplicasRequest(), timeout=5)
    return {r.replica_id for r in resp.replicas}


def replica(rid: str) -> pb.RegisterReplicaRequest:
    return pb.RegisterReplicaRequest(
        replica=pb.Replica(replica_id=rid, address=f"127.0.0.1:{len(rid)}", model="m", backend="sim")
    )


def events(logs: list[dict], name: str) -> int:
    return sum(1 for e in logs if e["event"] == name)


async def test_a_registry_whose_etcd_member_restarts_catches_up_on_the_other_registrys_replicas(
    tmp_path, etcd_cluster
):
    """Registry A talks only to etcd member 0, registry B to members 1 and 2. Member 0 is SIGKILLed (A's replica
    watch breaks); meanwhile B removes one replica and registers another. Once member 0 is back, A lists both
    changes without a restart, and a replica B registers afterwards arrives through A's new watch. A's
    fleetserve:registry_replica_watch_breaks_total goes from 0 to 1 and stays at 1 however often A retries while
    its member is down (one registry.replica_watch_broken log line); fleetserve:registry_replica_watch_up is 1
    before, 0 for as long as the member is down and 1 again once A has caught up (registry.replica_watch_resumed)."""
    follower = await start_registry(
        etcd_cluster.endpoints[:1], tmp_path, "a", PREFIX, lease_ttl_s=LEASE_TTL_S
    )
    writer = None
    try:
        writer = await start_registry(
            etcd_cluster.endpoints[1:], tmp_path, "b", PREFIX, lease_ttl_s=LEASE_TTL_S
        )
        async with (
            grpc.aio.insecure_channel(follower.address) as a,
            grpc.aio.insecure_channel(writer.address) as b_ch,
        ):
            b = pb_grpc.RegistryServiceStub(b_ch)
            assert watch_metrics(follower)[0] == 0  # the series is there before any break
            await b.RegisterReplica(replica("gone"), timeout=5)
            await assert_eventually(lambda: _lists(a, {"gone"}), timeout_s=10)  # through A's watch
            assert watch_metrics(follower) == (0, 1)

            with structlog.testing.capture_logs() as logs:
                etcd_cluster.kill(0)  # A's only member: its replica watch breaks
                await assert_eventually(lambda: watch_metrics(follower) == (1, 0), timeout_s=10)
                await b.DeregisterReplica(pb.DeregisterReplicaRequest(replica_id="gone"), timeout=10)
                await b.RegisterReplica(replica("during"), timeout=10)
                assert await listed(a) == {"gone"}  # A cannot know yet: its member is down
                # Retries every 0.1 s doubling while the member is down (the first ones already failed by now).
                await asyncio.sleep(1.0)
                # Still one break, not one per retry; and down all along: no retry's read succeeded.
                assert watch_metrics(follower) == (1, 0)
                await asyncio.to_thread(etcd_cluster.members[0].start)  # same data and ports: it rejoins

                # At most a few backoffs (capped at 5 s) after the member is back, A has caught up by its reread.
                await assert_eventually(lambda: _lists(a, {"during"}), timeout_s=30)
                await assert_eventually(lambda: watch_metrics(follower) == (1, 1), timeout_s=10)
                await b.RegisterReplica(replica("after"), timeout=5)
                await assert_eventually(lambda: _lists(a, {"during", "after"}), timeout_s=10)
            assert events(logs, "registry.replica_watch_broken") == 1
            resumed = [e for e in logs if e["event"] == "registry.replica_watch_resumed"]
            assert len(resumed) == 1 and resumed[0]["changed"] == 2 and resumed[0]["down_s"] > 1.0
            assert watch_metrics(follower) == (1, 1)
            # However it is retrying, following ends promptly when the registry stops.
            (follow,) = [t for t in follower.tasks if t.get_name() == "registry.follow_store"]
            follow.cancel()
            await asyncio.wait_for(asyncio.gather(follow, return_exceptions=True), 2)
            assert follow.cancelled()
    finally:
        if writer is not None:
            await writer.stop(0.2)
        await follower.stop(0.2)


async def _lists(channel: grpc.aio.Channel, ids: set[str]) -> bool:
    return await listed(channel) == ids


async def test_a_resync_keeps_a_replica_registered_here_after_its_read(tmp_path, etcd):
    """A resync with a read of etcd taken before a replica registered here (the race of a registration with the
    reread after a watch gap) keeps it: the read does not prove it gone (its write has a later revision), so
    ListReplicas still lists it and its heartbeats are still accepted, where dropping it would answer them
    LEASE_NOT_FOUND until the watch brought it back."""
    app = await start_registry([etcd.endpoint], tmp_path, "a", etcd.prefix, lease_ttl_s=LEASE_TTL_S)
    try:
        async with grpc.aio.insecure_channel(app.address) as ch:
            stub = pb_grpc.RegistryServiceStub(ch)
            await stub.RegisterReplica(replica("early"), timeout=5)
            stale, revision = await app.store.load_replicas()
            await stub.RegisterReplica(replica("late"), timeout=5)

            assert registry_app._resync(app.membership, stale, revision) == 0
            assert await listed(ch) == {"early", "late"}
            beats = stub.Heartbeat(timeout=5)
            await beats.write(pb.HeartbeatRequest(replica_id="late"))
            await beats.done_writing()
            assert (await beats).received == 1
    finally:
        await app.stop(0.2)


async def test_a_resync_leaves_a_registration_whose_store_write_is_in_flight_alone(tmp_path, etcd_cluster):
    """The registry's only etcd member is SIGSTOPped, so two registrations hang in their store write: `new`
    (absent from a read taken before) and `moved` registering again at a new address (the read holds its old
    record). A resync with that read neither drops `new` nor puts `moved` back at its old address (the revision
    of a write in flight is not known yet, so comparing revisions cannot protect it), and once the member
    resumes both stay as registered."""
    async with on_one_member(tmp_path, etcd_cluster, PREFIX, LEASE_TTL_S) as (app, ch, member):
        stub = pb_grpc.RegistryServiceStub(ch)
        await stub.RegisterReplica(at("moved", "127.0.0.1:1001"), timeout=5)
        stale, revision = await app.store.load_replicas()
        member.send_signal(signal.SIGSTOP)
        try:
            calls = [
                asyncio.ensure_future(stub.RegisterReplica(r, timeout=5))
                for r in (at("moved", "127.0.0.1:1002"), at("new", "127.0.0.1:1003"))
            ]
            # In memory, not yet in etcd.
            await assert_eventually(lambda: addresses(app) == WANTED, timeout_s=2)
            registry_app._resync(app.membership, stale, revision)
            assert addresses(app) == WANTED
        finally:
            member.send_signal(signal.SIGCONT)
        await asyncio.gather(*calls)
        # A write straight to etcd after both: once the watch has applied it, it has applied their echoes.
        await app.store.put_replica(pb.Replica(replica_id="marker", address="127.0.0.1:1004", model="m"), 0)
        await assert_eventually(lambda: "marker" in addresses(app), timeout_s=5)
        assert addresses(app) == {**WANTED, "marker": "127.0.0.1:1004"}


WANTED = {"moved": "127.0.0.1:1002", "new": "127.0.0.1:1003"}


def at(rid: str, address: str) -> pb.RegisterReplicaRequest:
    return pb.RegisterReplicaRequest(
        replica=pb.Replica(replica_id=rid, address=address, model="m", backend="sim")
    )


def addresses(app: registry_app.RegistryApp) -> dict[str, str]:
    return {r.replica_id: r.address for r in app.membership.list()}


async def test_a_resync_does_not_put_back_a_replica_deregistered_here_after_its_read(tmp_path, etcd_cluster):
    """A replica deregistered here leaves memory before its etcd delete lands. With the registry's watch down (the
    gap a resync closes) and its only etcd member SIGSTOPped (the delete hangs), a resync with a read taken before
    does not put it back: watchers get its REMOVED and no ADDED, ListReplicas leaves it out and its heartbeats
    are answered LEASE_NOT_FOUND; nor once the delete has landed at a revision later than the read's. A read
    after the delete is applied as it is."""
    async with on_one_member(tmp_path, etcd_cluster, PREFIX, LEASE_TTL_S) as (app, ch, member):
        (follow,) = [t for t in app.tasks if t.get_name() == "registry.follow_store"]
        follow.cancel()  # the watch gap: only the test's resyncs change memory from the store
        stub = pb_grpc.RegistryServiceStub(ch)
        await stub.RegisterReplica(at("gone", "127.0.0.1:1001"), timeout=5)
        watch = stub.WatchReplicas(pb.WatchReplicasRequest(), timeout=20)
        assert [r.replica_id for r in (await watch.read()).replicas] == ["gone"]  # the snapshot
        stale, revision = await app.store.load_replicas()
        member.send_signal(signal.SIGSTOP)
        try:
            call = asyncio.ensure_future(
                stub.DeregisterReplica(pb.DeregisterReplicaRequest(replica_id="gone"), timeout=5)
            )
            await assert_eventually(lambda: addresses(app) == {}, timeout_s=2)  # out of memory first
            assert registry_app._resync(app.membership, stale, revision) == 0
            assert addresses(app) == {} and await listed(ch) == set()
            await assert_heartbeat_refused(stub, "gone")
        finally:
            member.send_signal(signal.SIGCONT)
        assert (await call).found
        # The delete landed after the read: a read from before it still must not bring the replica back.
        assert registry_app._resync(app.membership, stale, revision) == 0
        assert addresses(app) == {}
        await app.store.put_replica(pb.Replica(replica_id="marker", address="127.0.0.1:1004", model="m"), 0)
        assert registry_app._resync(app.membership, *await app.store.load_replicas()) == 1
        seen = [await asyncio.wait_for(watch.read(), 5) for _ in range(2)]
        # Exactly REMOVED gone, then ADDED marker: the resyncs from before the delete sent nothing.
        assert [(e.type, [r.replica_id for r in e.replicas]) for e in seen] == [
            (pb.WATCH_EVENT_TYPE_REMOVED, ["gone"]),
            (pb.WATCH_EVENT_TYPE_ADDED, ["marker"]),
        ]
        assert addresses(app) == {"marker": "127.0.0.1:1004"}
        watch.cancel()


async def assert_heartbeat_refused(stub: pb_grpc.RegistryServiceStub, rid: str) -> None:
    beats = stub.Heartbeat(timeout=5)
    await beats.write(pb.HeartbeatRequest(replica_id=rid))
    await beats.done_writing()
    try:
        await beats
    except grpc.aio.AioRpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND
    else:
        raise AssertionError(f"a heartbeat of {rid!r} was accepted")

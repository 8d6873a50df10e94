"""A registry keeps following the other registries' traffic writes (flags, experiments, rollouts) through etcd
after its document watch broke: it watches again and reconciles, so a write made while it was cut off still
reaches its routers, and counts the break and shows each kind's watch down then up again on its /metrics."""

from __future__ import annotations

import asyncio
import signal

import grpc
from fleetserve.registry.v1 import registry_service_pb2 as reg_pb
from fleetserve.registry.v1 import registry_service_pb2_grpc as reg_grpc
from fleetserve.registry.v1 import rollout_service_pb2 as pb
from fleetserve.registry.v1 import rollout_service_pb2_grpc as pb_grpc

from services.registry import app as registry_app
from services.registry.store import DocChange, DocEvent
from tests.integration.etcd_registry import on_one_member, start_registry
from tests.support import assert_eventually

MODEL = "m"
PREFIX = "/follow/"
KINDS = ("rollout", "experiment", "flag", "model_version")


def watch_breaks(app: registry_app.RegistryApp) -> dict[str, float | None]:
    """fleetserve:registry_traffic_watch_breaks_total per kind, as the registry's /metrics serves it."""
    return {
        kind: app.metrics_registry.get_sample_value(
            "fleetserve:registry_traffic_watch_breaks_total", {"kind": kind}
        )
        for kind in KINDS
    }


def watch_up(app: registry_app.RegistryApp) -> dict[str, float | None]:
    """fleetserve:registry_traffic_watch_up per kind, as the registry's /metrics serves it."""
    return {
        kind: app.metrics_registry.get_sample_value("fleetserve:registry_traffic_watch_up", {"kind": kind})
        for kind in KINDS
    }


def flag(name: str) -> pb.FeatureFlag:
    return pb.FeatureFlag(
        name=name, model=MODEL, users=[name], variant=pb.Variant(routing_policy="round_robin")
    )


async def test_a_registry_whose_etcd_member_restarts_catches_up_on_the_other_registrys_flags(
    tmp_path, etcd_cluster
):
    """Registry A talks only to etcd member 0, registry B to members 1 and 2. Member 0 is SIGKILLed (A's watches
    break); meanwhile B deletes one flag and sets another. Once member 0 is back, A's WatchTraffic shows both
    changes without a restart, and a flag B sets afterwards arrives through A's new watch. A's
    fleetserve:registry_traffic_watch_breaks_total goes from 0 to 1 for every kind, and stays at 1 however often A
    retries while its member is down; its fleetserve:registry_traffic_watch_up is 1 for every kind before, 0 for
    as long as its member is down, and 1 again once A has caught up."""
    follower = await start_registry(etcd_cluster.endpoints[:1], tmp_path, "a", PREFIX)
    writer = None
    snapshots: list[pb.WatchTrafficResponse] = []
    try:
        writer = await start_registry(etcd_cluster.endpoints[1:], tmp_path, "b", PREFIX)
        async with (
            grpc.aio.insecure_channel(follower.address) as a_ch,
            grpc.aio.insecure_channel(writer.address) as b_ch,
        ):
            b = pb_grpc.RolloutServiceStub(b_ch)
            # A flag must name a model some replica registered with.
            replica = reg_pb.Replica(replica_id="r1", address="127.0.0.1:1", model=MODEL, backend="sim")
            await reg_grpc.RegistryServiceStub(b_ch).RegisterReplica(
                reg_pb.RegisterReplicaRequest(replica=replica), timeout=5
            )

            async def watch() -> None:
                async for snap in pb_grpc.RolloutServiceStub(a_ch).WatchTraffic(pb.WatchTrafficRequest()):
                    snapshots.append(snap)

            def a_flags() -> set[str]:
                return {f.name for f in snapshots[-1].flags} if snapshots else set()

            watcher = asyncio.create_task(watch())
            try:
                await b.SetFeatureFlag(pb.SetFeatureFlagRequest(flag=flag("gone")), timeout=5)
                await assert_eventually(lambda: a_flags() == {"gone"}, timeout_s=10)
                assert watch_breaks(follower) == dict.fromkeys(KINDS, 0)  # every series there before a break
                await assert_eventually(lambda: watch_up(follower) == dict.fromkeys(KINDS, 1), timeout_s=10)

                etcd_cluster.kill(0)  # A's only member: every watch of A breaks
                await assert_eventually(
                    lambda: watch_breaks(follower) == dict.fromkeys(KINDS, 1), timeout_s=10
                )
                await b.DeleteFeatureFlag(pb.DeleteFeatureFlagRequest(name="gone"), timeout=10)
                await b.SetFeatureFlag(pb.SetFeatureFlagRequest(flag=flag("during")), timeout=10)
                assert a_flags() == {"gone"}  # A cannot know yet: its member is down
                # A has been retrying (every 0.1 s doubling) all along: still one break per kind, not one per retry.
                assert watch_breaks(follower) == dict.fromkeys(KINDS, 1)
                # ... and down all along: no retry's read succeeded, so no kind is up again yet.
                assert watch_up(follower) == dict.fromkeys(KINDS, 0)
                await asyncio.to_thread(etcd_cluster.members[0].start)  # same data and ports: it rejoins

                # At most a few backoffs (capped at 5 s) after the member is back, A has caught up.
                await assert_eventually(lambda: a_flags() == {"during"}, timeout_s=30)
                await b.SetFeatureFlag(pb.SetFeatureFlagRequest(flag=flag("after")), timeout=5)
                await assert_eventually(lambda: a_flags() == {"during", "after"}, timeout_s=10)
                # Every kind reread, reconciled and watched again (versions and rollouts too, not only flags).
                await assert_eventually(lambda: watch_up(follower) == dict.fromkeys(KINDS, 1), timeout_s=30)
                # However it is retrying, following ends promptly when the registry stops.
                (follow,) = [t for t in follower.tasks if t.get_name() == "registry.follow_traffic"]
                follow.cancel()
                await asyncio.wait_for(asyncio.gather(follow, return_exceptions=True), 2)
                assert follow.cancelled()
            finally:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
    finally:
        if writer is not None:
            await writer.stop(0.2)
        await follower.stop(0.2)


async def test_a_reconcile_does_not_put_back_a_flag_deleted_here_after_its_read(tmp_path, etcd_cluster):
    """A registry deleting a flag deletes it in etcd, then drops it. With its traffic watch down (the gap a reconcile
    closes) and its only etcd member SIGSTOPped (the delete hangs), a reconcile with a read taken before changes
    nothing: the flag is still served until its delete is durable. Once it has landed (after the read), a reconcile
    with that read, or the watch's echo of the flag's save, does not put it back: WatchTraffic gets the snapshot
    without it and nothing more until a later flag. A read after the delete is applied as it is."""
    async with on_one_member(tmp_path, etcd_cluster, "/flag-delete/") as (app, ch, member):
        (follow,) = [t for t in app.tasks if t.get_name() == "registry.follow_traffic"]
        follow.cancel()  # the watch gap: only the test's reconciles change memory from the store
        traffic = app.rollouts.traffic
        replica = reg_pb.Replica(replica_id="r1", address="127.0.0.1:1", model=MODEL, backend="sim")
        await reg_grpc.RegistryServiceStub(ch).RegisterReplica(
            reg_pb.RegisterReplicaRequest(replica=replica), timeout=5
        )
        stub = pb_grpc.RolloutServiceStub(ch)
        await stub.SetFeatureFlag(pb.SetFeatureFlagRequest(flag=flag("gone")), timeout=5)
        watch = stub.WatchTraffic(pb.WatchTrafficRequest(), timeout=20)
        assert names(await watch.read()) == ["gone"]
        stale, revision = await app.store.load_docs("flag")
        member.send_signal(signal.SIGSTOP)
        try:
            call = asyncio.ensure_future(
                stub.DeleteFeatureFlag(pb.DeleteFeatureFlagRequest(name="gone"), timeout=5)
            )
            await assert_eventually(
                lambda: traffic.deletes["flag"].deleted_since("gone", revision), timeout_s=2
            )
            assert traffic._reconcile("flag", stale, revision) == 0
            assert list(traffic.flags) == ["gone"]  # durably deleted first
        finally:
            member.send_signal(signal.SIGCONT)
        assert (await call).found
        assert names(await asyncio.wait_for(watch.read(), 5)) == []
        # The delete landed after the read: neither that read nor the echo of the flag's save brings it back.
        assert traffic._reconcile("flag", stale, revision) == 0
        traffic._apply("flag", DocEvent(DocChange.PUT, stale[0]))
        assert "gone" not in traffic.flags
        await app.store.put_doc("flag", "marker", flag("marker").SerializeToString())
        assert traffic._reconcile("flag", *await app.store.load_docs("flag")) == 1
        # The next snapshot is the marker's: the stale reconcile and echo published nothing.
        assert names(await asyncio.wait_for(watch.read(), 5)) == ["marker"]
        watch.cancel()


def names(snapshot: pb.WatchTrafficResponse) -> list[str]:
    return [f.name for f in snapshot.flags]

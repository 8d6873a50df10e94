"""Registry membership: leases on an injected clock, expiry, drain, restore, and bounded watchers."""

from __future__ import annotations

import asyncio

from fleetserve.common.v1 import common_pb2
from fleetserve.registry.v1 import registry_service_pb2 as pb

from services.registry.membership import Membership
from services.registry.store import ReplicaEvent, StoredReplica

TTL = 3.0


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def replica(rid: str, model: str = "m") -> pb.Replica:
    return pb.Replica(replica_id=rid, address="127.0.0.1:5000", model=model, backend="sim")


def membership(clock: Clock, queue_size: int = 1024) -> Membership:
    return Membership(TTL, clock=clock, wall_clock=lambda: 1.7e9 + clock.now, watch_queue_size=queue_size)


async def drain_events(m: Membership, w) -> list[pb.WatchReplicasResponse]:
    """Every event queued for w now (none of these reads can block)."""
    out = []
    for _ in range(10_000):
        if w.queue.empty():
            break
        out.append(pb.WatchReplicasResponse.FromString(await m.next_event(w)))
    return out


def test_lease_expires_at_ttl_not_before():
    """A replica is kept until exactly ttl after registering, then expire() removes it and returns its id."""
    clock = Clock()
    m = membership(clock)
    m.register(replica("r1"))
    clock.now += TTL - 0.001
    assert m.expire() == []
    clock.now += 0.001
    assert m.expire() == ["r1"]
    assert m.list() == []


def test_heartbeat_renews_the_lease_and_records_load():
    """Each heartbeat pushes the lease end to now + ttl and stores the load and wall-clock time."""
    clock = Clock()
    m = membership(clock)
    m.register(replica("r1"))
    m.register(replica("r2"))
    for _ in range(5):
        clock.now += TTL * 0.9
        assert m.heartbeat("r1", common_pb2.ReplicaLoad(running=3)) is not None
        m.expire()
    assert [r.replica_id for r in m.list()] == ["r1"]
    rep = m.list()[0]
    assert rep.load.running == 3
    assert rep.last_heartbeat_unix == 1.7e9 + clock.now


def test_expire_with_explicit_now():
    """expire(now) judges leases against the given time, not the clock."""
    clock = Clock()
    m = membership(clock)
    m.register(replica("r1"))
    assert m.expire(now=clock.now + TTL + 1) == ["r1"]


def test_heartbeat_for_unknown_replica_is_none():
    """A heartbeat for an id with no lease is refused (the caller must register again)."""
    m = membership(Clock())
    assert m.heartbeat("ghost", common_pb2.ReplicaLoad()) is None


def test_drain_survives_heartbeats_and_register_sets_serving():
    """DRAINING sticks across heartbeats; a new registration is SERVING again."""
    m = membership(Clock())
    m.register(replica("r1"))
    assert m.drain("r1").state == pb.REPLICA_STATE_DRAINING
    m.heartbeat("r1", None)
    assert m.list()[0].state == pb.REPLICA_STATE_DRAINING
    m.register(replica("r1"))
    assert m.list()[0].state == pb.REPLICA_STATE_SERVING
    assert m.drain("ghost") is None


def test_restore_grants_a_fresh_lease():
    """Replicas loaded from storage get now + ttl, however old their last heartbeat."""
    clock = Clock()
    m = membership(clock)
    old = replica("r1")
    old.last_heartbeat_unix = 1.0
    assert m.restore([StoredReplica(old, 5.0)]) == 1
    clock.now += TTL - 0.01
    assert m.expire() == []
    assert m.get("r1").registered_at == 5.0
    clock.now += 0.01
    assert m.expire() == ["r1"]


def test_take_dirty_returns_each_heartbeated_replica_once():
    """Heartbeats are collected for one batched write: each replica once, then the set is empty."""
    m = membership(Clock())
    m.register(replica("r1"))
    m.register(replica("r2"))
    for _ in range(3):
        m.heartbeat("r1", common_pb2.ReplicaLoad(running=1))
    m.heartbeat("r2", None)
    m.remove("r2")
    assert [lease.replica.replica_id for lease in m.take_dirty()] == ["r1"]
    assert m.take_dirty() == []


async def test_a_record_older_than_a_delete_here_is_not_applied():
    """While this registry deletes a replica it removed, the echo of an earlier write of it (or a read from
    before) is skipped, watchers see no ADDED; once the watch brings a deletion of it, a later write applies."""
    m = membership(Clock())
    m.register(replica("r1"))
    m.remove("r1")
    m.deletes.deleting("r1")
    w = m.watch()
    await drain_events(m, w)  # the snapshot
    assert m.apply_store_event(ReplicaEvent("r1", StoredReplica(replica("r1"), 1.0), 5)) is None
    assert m.get("r1") is None and await drain_events(m, w) == []
    assert m.apply_store_event(ReplicaEvent("r1", None, 6)) is None  # the delete's echo: nothing to remove
    assert m.apply_store_event(ReplicaEvent("r1", StoredReplica(replica("r1"), 2.0), 7)) == "added"


async def test_watcher_gets_snapshot_then_changes_in_order():
    """A new watcher's first event is the snapshot; then ADDED, UPDATED, REMOVED in the order they happened."""
    clock = Clock()
    m = membership(clock)
    m.register(replica("r0"))
    w = m.watch()
    m.register(replica("r1"))
    m.heartbeat("r1", common_pb2.ReplicaLoad(waiting=2))
    m.remove("r0")
    events = await drain_events(m, w)
    kinds = [e.type for e in events]
    assert kinds == [
        pb.WATCH_EVENT_TYPE_SNAPSHOT,
        pb.WATCH_EVENT_TYPE_ADDED,
        pb.WATCH_EVENT_TYPE_UPDATED,
        pb.WATCH_EVENT_TYPE_REMOVED,
    ]
    assert events[2].replicas[0].load.waiting == 2
    assert [r.replica_id for r in events[3].replicas] == ["r0"]


async def test_reregister_under_another_model_removes_it_from_old_model_watchers():
    """A replica re-registered for another model leaves the old model's watchers (REMOVED) and joins the new."""
    m = membership(Clock())
    m.register(replica("r1", model="a"))
    wa, wb = m.watch("a"), m.watch("b")
    m.register(replica("r1", model="b"))
    ea, eb = await drain_events(m, wa), await drain_events(m, wb)
    assert [e.type for e in ea] == [pb.WATCH_EVENT_TYPE_SNAPSHOT, pb.WATCH_EVENT_TYPE_REMOVED]
    assert [e.type for e in eb] == [pb.WATCH_EVENT_TYPE_SNAPSHOT, pb.WATCH_EVENT_TYPE_ADDED]
    assert [r.replica_id for r in eb[1].replicas] == ["r1"]


async def test_slow_watcher_is_bounded_and_resynced_with_a_snapshot():
    """A watcher that never reads holds at most its queue size; on overflow its backlog becomes one fresh
    snapshot, while a reading watcher gets every event."""
    m = membership(Clock(), queue_size=8)
    m.register(replica("r1"))
    slow, fast = m.watch(), m.watch()
    await m.next_event(fast)  # its snapshot
    for i in range(100):
        m.heartbeat("r1", common_pb2.ReplicaLoad(running=i))
        assert slow.queue.qsize() <= 8
        ev = pb.WatchReplicasResponse.FromString(await m.next_event(fast))
        assert ev.replicas[0].load.running == i
    events = await drain_events(m, slow)
    assert slow.resyncs >= 1
    assert events[0].type == pb.WATCH_EVENT_TYPE_SNAPSHOT
    assert events[0].replicas[0].load.running >= 99 - 8, "the snapshot shows the membership as of reading"
    # Whatever followed the snapshot re-applies cleanly: the last word on r1 is the latest load.
    assert events[-1].replicas[0].load.running == 99
    assert len(events) <= 8


async def test_closed_watcher_reads_none_without_blocking():
    """close_watchers() ends every watch: the next read returns None at once, and again after that."""
    m = membership(Clock())
    w = m.watch()
    m.register(replica("r1"))
    m.close_watchers()
    assert await asyncio.wait_for(m.next_event(w), 1) is None
    assert await asyncio.wait_for(m.next_event(w), 1) is None
    assert m.watcher_count == 0

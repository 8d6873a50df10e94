"""The registry's in-memory membership: replicas with leases on an injectable clock, and bounded watchers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog
from fleetserve.common.v1 import common_pb2
from fleetserve.registry.v1 import registry_service_pb2 as pb

from services.registry.own_deletes import OwnDeletes
from services.registry.store import ReplicaEvent, StoredReplica

log = structlog.get_logger(__name__)

SNAPSHOT = pb.WATCH_EVENT_TYPE_SNAPSHOT
ADDED = pb.WATCH_EVENT_TYPE_ADDED
UPDATED = pb.WATCH_EVENT_TYPE_UPDATED
REMOVED = pb.WATCH_EVENT_TYPE_REMOVED

# Queue markers. The snapshot is built when the watcher reads the marker, not when it is queued, so a
# watcher that lags gets the membership as it is then (events queued after the marker re-apply cleanly:
# each carries the replica's whole state).
_RESYNC = object()
_CLOSED = object()


@dataclass(slots=True)
class Lease:
    """One registered replica: its current record, when its lease ends (monotonic clock), when it joined, and
    the store's handle on it (etcd: its lease id and the revision of the last write we know of)."""

    replica: pb.Replica
    expires_at: float
    registered_at: float
    store_lease: int = 0
    revision: int = 0
    # This registry's registration of it is being written to the store: memory holds it before the write's
    # revision is known (revision stays 0 until then), so no read of the store can show it stale or gone yet.
    writing: bool = False


ENGINES = pb.REPLICA_ROLE_ENGINE
ROUTERS = pb.REPLICA_ROLE_ROUTER


def has_role(replica: pb.Replica, role: int | None) -> bool:
    """Whether replica is of role (None: any; ENGINE or unspecified: an engine, the role of members that
    registered without one)."""
    if role is None:
        return True
    mine = replica.role or ENGINES
    return mine == (role or ENGINES)


class Watcher:
    """One WatchReplicas caller: a bounded queue of serialized events (or markers) for one model or all, of
    one role (engines unless it asked for routers)."""

    def __init__(self, model: str, maxsize: int, role: int = ENGINES) -> None:
        self.model = model
        self.role = role
        self.queue: asyncio.Queue[object] = asyncio.Queue(maxsize)
        self.resyncs = 0
        self.queue.put_nowait(_RESYNC)  # the first thing every watcher gets is a snapshot

    def wants(self, replica: pb.Replica) -> bool:
        return (not self.model or replica.model == self.model) and has_role(replica, self.role)

    def offer(self, item: object) -> None:
        """Queue item without ever blocking the publisher; on overflow, replace the backlog by a snapshot."""
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self._reset(_RESYNC)
            self.resyncs += 1
            log.warning("registry.watcher_resync", model=self.model, resyncs=self.resyncs)

    def close(self) -> None:
        """End the watch: whatever is queued is dropped, the reader sees the end next."""
        self._reset(_CLOSED)

    def _reset(self, marker: object) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(marker)


class Membership:
    """Replicas by id with leases. Every change is published to the watchers interested in it.

    `clock` (monotonic) decides leases; `wall_clock` (Unix seconds) stamps last_heartbeat_unix. Both are
    injectable so lease logic is tested without waiting."""

    def __init__(
        self,
        lease_ttl_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        watch_queue_size: int = 1024,
    ) -> None:
        self.lease_ttl_s = lease_ttl_s
        self._clock = clock
        self._wall = wall_clock
        self._watch_queue_size = watch_queue_size
        self._leases: dict[str, Lease] = {}
        self._watchers: set[Watcher] = set()
        # Replicas heartbeated since the last take_dirty(): persisted in batches, not per heartbeat.
        self._dirty: set[str] = set()
        # Replicas heartbeated here since the last take_beaten(): their store leases are renewed (etcd).
        self._beaten: set[str] = set()
        # Replicas removed here whose store delete is in flight or landed at a revision the watch has not passed
        # yet: a read of the store from before the delete still holds them.
        self.deletes: OwnDeletes[str] = OwnDeletes()

    # -- changes -------------------------------------------------------------------------------------

    def register(self, replica: pb.Replica) -> Lease:
        """Add replica (replacing one with the same id) with a fresh lease; SERVING unless a state is given."""
        rep = pb.Replica()
        rep.CopyFrom(replica)
        if rep.state == pb.REPLICA_STATE_UNSPECIFIED:
            rep.state = pb.REPLICA_STATE_SERVING
        rep.last_heartbeat_unix = self._wall()
        old = self._leases.get(rep.replica_id)
        registered_at = self._wall()
        if old is not None and rep.started_unix and old.replica.started_unix == rep.started_unix:
            # The same process registering again (lease lost, registry restarted): it joined back then, which
            # is what cold-start measurements need.
            registered_at = old.registered_at
        rep.registered_unix = registered_at
        lease = Lease(rep, self._clock() + self.lease_ttl_s, registered_at)
        self._leases[rep.replica_id] = lease
        self._dirty.discard(rep.replica_id)
        if old is not None and old.replica.model != rep.model:
            # Watchers of the old model must forget it; ADDED alone would only reach the new model's.
            self._publish(REMOVED, old.replica)
        self._publish(ADDED, rep)
        return lease

    def restore(self, entries: Iterable[StoredReplica]) -> int:
        """Load replicas from storage, each with a fresh lease: after a registry restart a fleet that keeps
        heartbeating keeps its membership. Returns how many were loaded."""
        n = 0
        expires_at = self._clock() + self.lease_ttl_s
        for s in entries:
            replica = s.replica
            replica.registered_unix = s.registered_at
            self._leases[replica.replica_id] = Lease(
                replica, expires_at, s.registered_at, s.lease, s.revision
            )
            self._publish(ADDED, replica)
            n += 1
        return n

    def attach(self, replica_id: str, store_lease: int, revision: int) -> None:
        """Record the store's handle on a replica after writing it (its etcd lease and the write's revision)."""
        lease = self._leases.get(replica_id)
        if lease is not None:
            lease.store_lease = store_lease or lease.store_lease
            lease.revision = max(lease.revision, revision)

    def apply_store_event(self, event: ReplicaEvent) -> str | None:
        """Apply a membership change another writer made in a shared store (another registry registered,
        drained or reported load; the store expired a lease). Echoes of changes this registry already
        applied (revision not newer than the one it knows) are skipped. Returns what changed: "added",
        "updated", "removed" or None."""
        old = self._leases.get(event.replica_id)
        if event.stored is None:
            # The store's history is past a deletion of it: whatever comes of it next is a later write.
            self.deletes.deletion_seen(event.replica_id)
            if old is None:
                return None
            self.remove(event.replica_id)
            return "removed"
        if old is not None and event.revision <= old.revision:
            return None
        if old is None and self.deletes.deleted_since(event.replica_id, event.revision):
            # A record from before this registry deleted it (a read or a watch echo that raced the delete):
            # applying it would announce a replica that is gone.
            return None
        s = event.stored
        rep = pb.Replica()
        rep.CopyFrom(s.replica)
        if old is None:
            self._leases[rep.replica_id] = Lease(
                rep, self._clock() + self.lease_ttl_s, s.registered_at, s.lease, event.revision
            )
            self._publish(ADDED, rep)
            return "added"
        moved = old.replica.model != rep.model
        if moved:
            self._publish(REMOVED, old.replica)
        old.replica = rep
        old.registered_at = s.registered_at
        old.store_lease = s.lease or old.store_lease
        old.revision = event.revision
        # Alive as far as the store is concerned: the store owns expiry, our own reaper must not race it.
        old.expires_at = self._clock() + self.lease_ttl_s
        self._publish(ADDED if moved else UPDATED, rep)
        return "updated"

    def take_beaten(self) -> list[Lease]:
        """Replicas heartbeated here since the last call (whose store leases to renew)."""
        beaten, self._beaten = self._beaten, set()
        return [self._leases[rid] for rid in beaten if rid in self._leases]

    def heartbeat(self, replica_id: str, load: common_pb2.ReplicaLoad | None) -> pb.Replica | None:
        """Renew replica_id's lease and record its load; None if it is not registered (it must register)."""
        lease = self._leases.get(replica_id)
        if lease is None:
            return None
        lease.expires_at = self._clock() + self.lease_ttl_s
        rep = lease.replica
        if load is not None:
            rep.load.CopyFrom(load)
        rep.last_heartbeat_unix = self._wall()
        self._dirty.add(replica_id)
        self._beaten.add(replica_id)
        self._publish(UPDATED, rep)
        return rep

    def drain(self, replica_id: str) -> pb.Replica | None:
        """Mark replica_id DRAINING (it stays listed until its lease ends); None if unknown."""
        lease = self._leases.get(replica_id)
        if lease is None:
            return None
        if lease.replica.state != pb.REPLICA_STATE_DRAINING:
            lease.replica.state = pb.REPLICA_STATE_DRAINING
            self._publish(UPDATED, lease.replica)
        return lease.replica

    def remove(self, replica_id: str) -> pb.Replica | None:
        """Remove replica_id now; the removed replica, or None if unknown."""
        lease = self._leases.pop(replica_id, None)
        if lease is None:
            return None
        self._dirty.discard(replica_id)
        self._beaten.discard(replica_id)
        self._publish(REMOVED, lease.replica)
        return lease.replica

    def expire(self, now: float | None = None) -> list[str]:
        """Remove every replica whose lease ended by now (default: the clock); their ids."""
        now = self._clock() if now is None else now
        gone = [rid for rid, lease in self._leases.items() if lease.expires_at <= now]
        for rid in gone:
            self.remove(rid)
        return gone

    def take_dirty(self) -> list[Lease]:
        """Replicas heartbeated since the last call (for the batched write of load to storage)."""
        dirty, self._dirty = self._dirty, set()
        return [self._leases[rid] for rid in dirty if rid in self._leases]

    # -- queries -------------------------------------------------------------------------------------

    def get(self, replica_id: str) -> Lease | None:
        return self._leases.get(replica_id)

    def __len__(self) -> int:
        return len(self._leases)

    def list(self, model: str = "", role: int | None = ENGINES) -> list[pb.Replica]:
        """Replicas (of model, or all) of role (engines by default; None: every member), by id. Live records:
        copy before changing them."""
        reps = (self._leases[rid].replica for rid in sorted(self._leases))
        return [r for r in reps if (not model or r.model == model) and has_role(r, role)]

    def snapshot(self, model: str = "", role: int = ENGINES) -> pb.WatchReplicasResponse:
        """A SNAPSHOT event of the membership now (of model, or all; of role)."""
        return pb.WatchReplicasResponse(type=SNAPSHOT, replicas=self.list(model, role))

    # -- watchers ------------------------------------------------------------------------------------

    def watch(self, model: str = "", role: int = ENGINES) -> Watcher:
        """A new watcher; its first event is a snapshot. Call unwatch() when the caller leaves."""
        w = Watcher(model, self._watch_queue_size, role)
        self._watchers.add(w)
        return w

    def unwatch(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    def close_watchers(self) -> None:
        """End every watch (shutdown)."""
        for w in self._watchers:
            w.close()
        self._watchers.clear()

    @property
    def watcher_count(self) -> int:
        return len(self._watchers)

    async def next_event(self, watcher: Watcher) -> bytes | None:
        """The watcher's next event as serialized WatchReplicasResponse bytes; None once the watch is closed."""
        item = await watcher.queue.get()
        if item is _CLOSED:
            watcher.queue.put_nowait(_CLOSED)  # stay closed for any later read
            return None
        if item is _RESYNC:
            return self.snapshot(watcher.model, watcher.role).SerializeToString()
        return item  # type: ignore[return-value]

    def _publish(self, kind: int, replica: pb.Replica) -> None:
        # Serialized once and shared: every watcher gets the same bytes, the server sends them as they are.
        data: bytes | None = None
        for w in self._watchers:
            if w.wants(replica):
                if data is None:
                    data = pb.WatchReplicasResponse(type=kind, replicas=[replica]).SerializeToString()
                w.offer(data)

"""fleetserve.registry.v1.RegistryService: registration with leases, heartbeats, drain, list and watch."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from fleetserve.registry.v1 import registry_service_pb2 as pb
from opentelemetry import metrics, trace

from services.registry.membership import Membership
from services.registry.store import RegistryStore, StoredReplica, StoreError
from shared.errors import InvalidArgument, NotFound, Unavailable, rpc_boundary
from shared.telemetry import context_from_metadata

log = structlog.get_logger(__name__)

LEASE_NOT_FOUND = "LEASE_NOT_FOUND"
# Store document kind of the autoscaler's per-model state (ReportScaling / GetScaling).
SCALING_DOCS = "autoscaler"
MAX_ID_LEN = 256


def _is_host_port(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def validate_replica(replica: pb.Replica | None) -> None:
    """Raise InvalidArgument naming every bad field of a replica to register."""
    if replica is None:
        raise InvalidArgument("replica is required", field_violations=[("replica", "required")])
    bad: list[tuple[str, str]] = []
    if not replica.replica_id:
        bad.append(("replica.replica_id", "must not be empty"))
    elif len(replica.replica_id) > MAX_ID_LEN:
        bad.append(("replica.replica_id", f"at most {MAX_ID_LEN} characters"))
    if not replica.address:
        bad.append(("replica.address", "must not be empty"))
    else:
        if not _is_host_port(replica.address):
            bad.append(("replica.address", "must be host:port"))
    for i, endpoint in enumerate(replica.endpoints):
        if not _is_host_port(endpoint) or "," in endpoint:
            bad.append((f"replica.endpoints[{i}]", "must be host:port"))
    if bad:
        raise InvalidArgument(
            "invalid replica: " + "; ".join(f"{f} {d}" for f, d in bad), field_violations=bad
        )


class RegistryServicer:
    """Membership changes go to the store at once; heartbeats only to memory (app.py persists them in batches)."""

    def __init__(
        self,
        membership: Membership,
        store: RegistryStore,
        tracer: trace.Tracer,
        meter: metrics.Meter,
        *,
        lease_ttl_s: float,
        heartbeat_interval_s: float,
        on_register: Callable[[pb.Replica], Awaitable[None]] | None = None,
        on_version: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> None:
        self.membership = membership
        # Told of every registration (the rollouts' record of the versions each model ever had).
        self.on_register = on_register
        # Told of every (model, version) an autoscaler can start (ReportScaling): a rollout may name it first.
        self.on_version = on_version
        self.store = store
        self.tracer = tracer
        self.lease_ttl_s = lease_ttl_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self._heartbeats = meter.create_counter(
            "fleetserve.registry.heartbeats", unit="{heartbeat}", description="Heartbeats received."
        )
        self._changes = meter.create_counter(
            "fleetserve.registry.membership_changes",
            unit="{change}",
            description="Registrations, drains, deregistrations and expiries.",
        )
        self._cold_starts = meter.create_histogram(
            "fleetserve.registry.cold_start",
            unit="s",
            description="Replica cold starts: from its process start to its first registration as SERVING.",
        )

    def count_change(self, kind: str, n: int = 1) -> None:
        self._changes.add(n, {"change": kind})

    @rpc_boundary
    async def RegisterReplica(
        self, request: pb.RegisterReplicaRequest, context
    ) -> pb.RegisterReplicaResponse:
        with self.tracer.start_as_current_span(
            "registry.RegisterReplica", context=context_from_metadata(context), kind=trace.SpanKind.SERVER
        ) as span:
            validate_replica(request.replica if request.HasField("replica") else None)
            span.set_attribute("fleetserve.replica_id", request.replica.replica_id)
            previous = self.membership.get(request.replica.replica_id)
            replaced = previous is not None
            old_store_lease = previous.store_lease if previous is not None else 0
            lease = self.membership.register(request.replica)
            r = lease.replica
            # Until attach() gives it the write's revision: app._resync must not undo it.
            lease.writing = True
            try:
                stored = await self.store.put_replica(r, lease.registered_at)
            except StoreError as e:
                # Not durable means not registered: the replica retries, and no registry serves a member the
                # others cannot see.
                self.membership.remove(r.replica_id)
                raise Unavailable(
                    f"the registry's store is unavailable: {e}", reason="STORE_UNAVAILABLE", retry_after_s=1.0
                ) from None
            finally:
                # Also when the caller went away mid-write: an entry whose write never landed must stay
                # removable by the next resync.
                lease.writing = False
            self.membership.attach(r.replica_id, stored.lease, stored.revision)
            if self.on_register is not None:
                await self.on_register(r)
            if old_store_lease and old_store_lease != stored.lease:
                await self._revoke(old_store_lease)
            self.count_change("registered")
            first = not replaced or previous.registered_at != lease.registered_at
            cold_start_s = r.registered_unix - r.started_unix if r.started_unix and first else None
            if cold_start_s is not None and cold_start_s >= 0:
                self._cold_starts.record(cold_start_s, {"fleetserve.model": r.model})
            log.info(
                "registry.replica_registered",
                replica_id=r.replica_id,
                address=r.address,
                model=r.model,
                model_version=r.model_version,
                backend=r.backend,
                replaced=replaced,
                cold_start_s=None if cold_start_s is None else round(cold_start_s, 3),
            )
            return pb.RegisterReplicaResponse(
                lease_ttl_s=self.lease_ttl_s, heartbeat_interval_s=self.heartbeat_interval_s
            )

    @rpc_boundary
    async def Heartbeat(self, request_iterator, context) -> pb.HeartbeatResponse:
        # The hot path of the registry: one message per replica per interval. No span, no log, no db write.
        received = 0
        async for hb in request_iterator:
            load = hb.load if hb.HasField("load") else None
            if self.membership.heartbeat(hb.replica_id, load) is None:
                log.info("registry.lease_not_found", replica_id=hb.replica_id, received=received)
                raise NotFound(
                    f"replica {hb.replica_id!r} holds no lease; register again",
                    reason=LEASE_NOT_FOUND,
                    metadata={"replica_id": hb.replica_id},
                )
            received += 1
            self._heartbeats.add(1)
        return pb.HeartbeatResponse(received=received)

    @rpc_boundary
    async def DeregisterReplica(
        self, request: pb.DeregisterReplicaRequest, context
    ) -> pb.DeregisterReplicaResponse:
        with self.tracer.start_as_current_span(
            "registry.DeregisterReplica", context=context_from_metadata(context), kind=trace.SpanKind.SERVER
        ) as span:
            rid = request.replica_id
            span.set_attribute("fleetserve.replica_id", rid)
            try:
                if request.drain:
                    rep = self.membership.drain(rid)
                    if rep is not None:
                        lease = self.membership.get(rid)
                        revision = await self.store.set_state(self._stored(lease), rep.state)
                        self.membership.attach(rid, 0, revision)
                        self.count_change("drained")
                else:
                    lease = self.membership.get(rid)
                    rep = self.membership.remove(rid)
                    if rep is not None:
                        await self._delete(rid)
                        if lease is not None and lease.store_lease:
                            await self._revoke(lease.store_lease)
                        self.count_change("deregistered")
            except StoreError as e:
                raise Unavailable(
                    f"the registry's store is unavailable: {e}", reason="STORE_UNAVAILABLE", retry_after_s=1.0
                ) from None
            log.info(
                "registry.replica_deregistered", replica_id=rid, drain=request.drain, found=rep is not None
            )
            return pb.DeregisterReplicaResponse(found=rep is not None)

    async def _delete(self, rid: str) -> None:
        """Delete a replica already removed from memory from the store, recording the delete so that a resync
        with a read from before it (which still holds the replica) does not put it back."""
        self.membership.deletes.deleting(rid)
        revision = 0
        try:
            revision = await self.store.delete_replicas([rid])
        finally:
            self.membership.deletes.deleted(rid, revision)

    @staticmethod
    def _stored(lease) -> StoredReplica:
        return StoredReplica(lease.replica, lease.registered_at, lease.store_lease, lease.revision)

    async def _revoke(self, store_lease: int) -> None:
        revoke = getattr(self.store, "revoke", None)
        if revoke is None:
            return
        try:
            await revoke(store_lease)
        except StoreError as e:  # an unused lease runs out on its own
            log.info("registry.lease_revoke_failed", error=str(e))

    @rpc_boundary
    async def ReportScaling(self, request: pb.ReportScalingRequest, context) -> pb.ReportScalingResponse:
        for m in request.models:
            if not m.model:
                raise InvalidArgument(
                    "models[].model is required", field_violations=[("models.model", "required")]
                )
        try:
            for m in request.models:
                await self.store.put_doc(SCALING_DOCS, m.model, m.SerializeToString())
                if self.on_version is not None:
                    for v in m.available_versions:
                        await self.on_version(m.model, v)
        except StoreError as e:
            raise Unavailable(
                f"the registry's store is unavailable: {e}", reason="STORE_UNAVAILABLE", retry_after_s=1.0
            ) from None
        return pb.ReportScalingResponse()

    @rpc_boundary
    async def GetScaling(self, request: pb.GetScalingRequest, context) -> pb.GetScalingResponse:
        try:
            docs = await self.store.list_docs(SCALING_DOCS)
        except StoreError as e:
            raise Unavailable(
                f"the registry's store is unavailable: {e}", reason="STORE_UNAVAILABLE", retry_after_s=1.0
            ) from None
        models = [
            pb.ModelScaling.FromString(d.value) for d in docs if not request.model or d.name == request.model
        ]
        return pb.GetScalingResponse(models=models)

    @rpc_boundary
    async def ListReplicas(self, request: pb.ListReplicasRequest, context) -> pb.ListReplicasResponse:
        return pb.ListReplicasResponse(replicas=self.membership.list(request.model, request.role))

    @rpc_boundary
    async def WatchReplicas(self, request: pb.WatchReplicasRequest, context):
        # Yields serialized WatchReplicasResponse bytes (relay_bytes): each event is encoded once for all
        # watchers instead of once per watcher.
        watcher = self.membership.watch(request.model, request.role)
        log.info("registry.watch_started", model=request.model, watchers=self.membership.watcher_count)
        sent = 0
        try:
            while True:
                data = await self.membership.next_event(watcher)
                if data is None:
                    return
                yield data
                sent += 1
        finally:
            # Runs when the caller leaves too (CancelledError at the await), which is how most watches end.
            self.membership.unwatch(watcher)
            log.info("registry.watch_ended", model=request.model, events=sent, resyncs=watcher.resyncs)

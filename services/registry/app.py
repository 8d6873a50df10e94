"""Registry process wiring: the database, the membership restored from it, the reaper, the persister, the server."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import structlog
from fleetserve.registry.v1 import registry_service_pb2 as pb
from fleetserve.registry.v1 import rollout_service_pb2 as rollout_pb
from opentelemetry.metrics import CallbackOptions, Observation
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry

from services.registry import store_follow
from services.registry.config import RegistrySettings
from services.registry.membership import Lease, Membership
from services.registry.rollouts import stats
from services.registry.rollouts.controller import RolloutController
from services.registry.rollouts.metrics_source import MetricsServiceSource
from services.registry.rollouts.servicer import RolloutServicer
from services.registry.rollouts.traffic import TrafficState
from services.registry.servicer import RegistryServicer
from services.registry.store import RegistryStore, ReplicaEvent, StoredReplica, StoreError, open_store
from services.router import policies
from shared import prom
from shared.server import RunningServer, Service, cancel_and_wait, create_server, drain_and_stop
from shared.telemetry import Telemetry
from shared.tls import Tls

log = structlog.get_logger(__name__)

# Backoff (full jitter) before watching a shared store again after its watch broke: membership and traffic alike.
WATCH_BACKOFF_BASE_S, WATCH_BACKOFF_MAX_S = 0.1, 5.0


async def reap_once(servicer: RegistryServicer) -> list[str]:
    """Remove replicas whose lease ended, from memory (watchers see REMOVED) and from the database."""
    membership = servicer.membership
    expired = membership.expire()
    if expired:
        await servicer.store.delete_replicas(expired)
        servicer.count_change("expired", len(expired))
        for rid in expired:
            log.warning("registry.replica_expired", replica_id=rid, lease_ttl_s=membership.lease_ttl_s)
    return expired


async def persist_once(membership: Membership, store: RegistryStore) -> int:
    """Write the load of every replica heartbeated since the last call, in one batch; how many were written."""
    written = await store.save_heartbeats(
        [
            StoredReplica(lease.replica, lease.registered_at, lease.store_lease, lease.revision)
            for lease in membership.take_dirty()
        ]
    )
    for rid, revision in written.items():
        membership.attach(rid, 0, revision)  # so the store's echo of our own write is not applied again
    return len(written)


async def keepalive_once(membership: Membership, store: RegistryStore) -> int:
    """Renew the store's leases of the replicas that heartbeated here (etcd); a lease the store no longer
    knows means etcd expired the replica, whose removal the watch delivers. How many were renewed."""
    beaten = membership.take_beaten()
    gone = await store.keepalive(lease.store_lease for lease in beaten)
    for lease in beaten:
        if lease.store_lease in gone:
            log.warning("registry.store_lease_lost", replica_id=lease.replica.replica_id)
    return len(beaten) - len(gone)


class ReplicaWatchMetrics:
    """`fleetserve:registry_replica_watch_breaks_total` and `fleetserve:registry_replica_watch_up`: the membership
    watch's counterpart of the traffic watch's pair (its own names: replicas are not traffic documents, and the
    traffic names stay what dashboards and alerts already use). Only a registry over a shared store has them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # Both series exist from the start (breaks at 0, up at 0 until follow_store first reads): a first break is
        # then an increase() in Prometheus, not a series appearing at 1.
        self.breaks = prom.counter(
            "fleetserve:registry_replica_watch_breaks",
            "Breaks of the shared store's watch of replica membership: once per break, however many retries it "
            "takes to watch again.",
            (),
            registry,
        )
        self.up = prom.gauge(
            "fleetserve:registry_replica_watch_up",
            "1 while the shared store's watch of replica membership is established and applying changes, 0 from a "
            "break (or start) until a fresh read and resync precede the next watch.",
            (),
            registry,
        )


async def follow_store(
    membership: Membership,
    servicer: RegistryServicer,
    metrics: ReplicaWatchMetrics,
    backoff_base_s: float = WATCH_BACKOFF_BASE_S,
    backoff_max_s: float = WATCH_BACKOFF_MAX_S,
) -> None:
    """Apply membership changes made through a shared store by other registries (and etcd's expiries) until
    cancelled: read and resync, then watch from that read; a broken watch is read, resynced and watched again."""

    def apply(event: ReplicaEvent) -> None:
        # The watch is past this revision, so the next read (after a break) is too.
        membership.deletes.forget(event.revision)
        change = membership.apply_store_event(event)
        if change == "removed":
            servicer.count_change("removed_by_store")
            log.info("registry.replica_removed_by_store", replica_id=event.replica_id)
        elif change == "added":
            log.info("registry.replica_added_by_store", replica_id=event.replica_id)

    await store_follow.follow(
        servicer.store.load_replicas,
        lambda stored, revision: _resync(membership, stored, revision),
        servicer.store.watch_replicas,
        apply,
        breaks=metrics.breaks,
        up=metrics.up,
        event="registry.replica_watch",
        backoff_base_s=backoff_base_s,
        backoff_max_s=backoff_max_s,
    )


def _resync(membership: Membership, stored: list[StoredReplica], revision: int) -> int:
    """Make memory match a fresh read of the store taken at revision (after a watch gap): add and update what
    the read holds, remove what it proves gone. How many replicas changed."""
    # A registration or deregistration here races the read: memory has it from before its store write, which
    # may land after the read's revision (or still be in flight). Dropping a registration, putting a
    # deregistered replica back, or overwriting either with the read's older record would flap it for routers
    # (and answer heartbeats wrongly); what happens to it after the read reaches the watch from this revision.
    membership.deletes.forget(revision)
    fresh = {s.replica.replica_id: s for s in stored}
    changed = 0
    for rep in list(membership.list(role=None)):
        lease = membership.get(rep.replica_id)
        if rep.replica_id not in fresh and _read_proves_gone(lease, revision):
            changed += membership.apply_store_event(ReplicaEvent(rep.replica_id, None, 0)) is not None
    for rid, s in fresh.items():
        lease = membership.get(rid)
        # (A replica deregistered here after the read is not in memory: apply_store_event skips its record.)
        if lease is None or not lease.writing:
            changed += membership.apply_store_event(ReplicaEvent(rid, s, s.revision)) is not None
    return changed


def _read_proves_gone(lease: Lease, revision: int) -> bool:
    """Whether a replica missing from a read taken at revision is gone: not written here after the read (a
    later write has a later revision, and its deletion, if any, then reaches the watch from this revision), and
    not being written now (revision unknown until the write returns)."""
    return not lease.writing and lease.revision <= revision


def replica_counts(membership: Membership) -> dict[tuple[str, int], int]:
    """Registered replicas per (model, state)."""
    counts: dict[tuple[str, int], int] = {}
    for r in membership.list():
        counts[(r.model, r.state)] = counts.get((r.model, r.state), 0) + 1
    return counts


_STATES = (pb.REPLICA_STATE_SERVING, pb.REPLICA_STATE_DRAINING)


def replica_families(membership: Membership, seen: set[str]) -> list[GaugeMetricFamily]:
    """`fleetserve:registry_replicas{model_name, state}`: the replicas that actually exist (what an autoscaler's
    desired count is compared with), state serving or draining. A model seen once stays, at 0 when its last
    replica is gone (a series that vanished would read as "no data", not as zero replicas); `seen` remembers
    them."""
    counts = replica_counts(membership)
    seen.update(model for model, _ in counts)
    family = GaugeMetricFamily(
        "fleetserve:registry_replicas",
        "Replicas registered, by model and state (serving, draining).",
        labels=("model_name", "state"),
    )
    for model in sorted(seen):
        for state in _STATES:
            name = pb.ReplicaState.Name(state).removeprefix("REPLICA_STATE_").lower()
            family.add_metric([model, name], counts.get((model, state), 0))
    return [family]


async def _every(interval_s: float, name: str, fn) -> None:
    """Await fn() every interval_s until cancelled; an error is logged and the loop goes on."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await fn()
        except StoreError as e:  # etcd away for a while: the next tick tries again
            log.warning("registry.store_unavailable", task=name, error=str(e))
        except Exception:  # a failing tick (disk full, say) must not stop leases from expiring later
            log.exception("registry.background_error", task=name)


@dataclass
class RegistryApp:
    """A started registry."""

    running: RunningServer
    servicer: RegistryServicer
    membership: Membership
    store: RegistryStore
    rollouts: RolloutServicer
    tasks: list[asyncio.Task] = field(default_factory=list)
    # The registry's Prometheus series (served on its /metrics).
    metrics_registry: CollectorRegistry | None = None

    @property
    def address(self) -> str:
        return self.running.address

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING, end the watches, let other RPCs finish within grace_s, then flush heartbeats and close
        the database."""

        async def before_stop() -> None:
            # Watches never end by themselves; ending them now lets watchers reconnect elsewhere at once.
            self.membership.close_watchers()
            self.rollouts.traffic.close_watchers()

        async def after_stop() -> None:
            await cancel_and_wait(self.tasks)
            if self.rollouts.metrics is not None:
                await self.rollouts.metrics.close()
            try:
                await persist_once(self.membership, self.store)
            except StoreError as e:
                log.warning("registry.final_persist_failed", error=str(e))
            await self.store.close()

        await drain_and_stop(self.running, grace_s, before_stop=before_stop, after_stop=after_stop)


async def start(settings: RegistrySettings, telemetry: Telemetry) -> RegistryApp:
    """Open the store, restore its replicas with fresh leases, then serve; reap expired leases (SQLite) or
    follow the shared store's changes and renew its leases (etcd)."""
    tls = Tls.from_settings(settings)
    store = open_store(
        settings.store,
        db_path=settings.db_path,
        etcd_endpoint=settings.etcd_endpoint,
        etcd_prefix=settings.etcd_prefix,
    )
    try:
        await store.open(settings.lease_ttl_s)
        membership = Membership(settings.lease_ttl_s, watch_queue_size=settings.watch_queue_size)
        stored, _ = await store.load_replicas()
        restored = membership.restore(stored)
        metrics_registry = prom.new_registry()
        traffic = TrafficState(store, metrics_registry)
        await traffic.load()
        for r in membership.list():
            await traffic.saw_version(r.model, r.model_version)
        servicer = RegistryServicer(
            membership,
            store,
            telemetry.tracer,
            telemetry.meter,
            lease_ttl_s=settings.lease_ttl_s,
            heartbeat_interval_s=settings.heartbeat_interval_s,
            on_register=lambda r: traffic.saw_version(r.model, r.model_version),
            on_version=traffic.saw_version,
        )
        source = MetricsServiceSource(settings.metrics_address, tls=tls) if settings.metrics_address else None
        controller = RolloutController(traffic, membership, source, telemetry.meter)
        rollouts = RolloutServicer(traffic, controller, source, policies.available())

        def observe_replicas(_options: CallbackOptions):
            counts: dict[tuple[str, str, int], int] = {}
            for r in membership.list():
                key = (r.model, r.model_version, r.state)
                counts[key] = counts.get(key, 0) + 1
            return [
                Observation(
                    n, {"model": model, "model_version": version, "state": pb.ReplicaState.Name(state)}
                )
                for (model, version, state), n in counts.items()
            ]

        telemetry.meter.create_observable_gauge(
            "fleetserve.registry.replicas",
            callbacks=[observe_replicas],
            unit="{replica}",
            description="Registered replicas by model, version and state.",
        )
        running = await create_server(
            [
                Service(pb, "RegistryService", servicer, relay_bytes=frozenset({"WatchReplicas"})),
                Service(rollout_pb, "RolloutService", rollouts, relay_bytes=frozenset({"WatchTraffic"})),
            ],
            settings.host,
            settings.port,
            tls=tls,
        )
    except BaseException:
        await store.close()
        raise
    app = RegistryApp(running, servicer, membership, store, rollouts, metrics_registry=metrics_registry)
    seen: set[str] = set()
    app.metrics_registry.register(prom.LoopCollector(lambda: replica_families(membership, seen)))
    app.tasks.append(
        asyncio.create_task(
            traffic.follow(WATCH_BACKOFF_BASE_S, WATCH_BACKOFF_MAX_S), name="registry.follow_traffic"
        )
    )
    app.tasks.append(asyncio.create_task(asyncio.to_thread(stats.warm_up), name="registry.stats_warm_up"))
    app.tasks.append(
        asyncio.create_task(controller.run(settings.rollout_interval_s), name="registry.rollout_controller")
    )
    if store.external_leases:
        # The store expires silent replicas (etcd leases): renew the leases of those that heartbeat here,
        # and follow what other registries and etcd change.
        app.tasks.append(
            asyncio.create_task(
                _every(settings.reaper_interval_s, "keepalive", lambda: keepalive_once(membership, store)),
                name="registry.keepalive",
            )
        )
        replica_watch = ReplicaWatchMetrics(app.metrics_registry)
        app.tasks.append(
            asyncio.create_task(
                follow_store(membership, servicer, replica_watch), name="registry.follow_store"
            )
        )
    else:
        app.tasks.append(
            asyncio.create_task(
                _every(settings.reaper_interval_s, "reaper", lambda: reap_once(servicer)),
                name="registry.reaper",
            )
        )
    app.tasks.append(
        asyncio.create_task(
            _every(settings.persist_interval_s, "persister", lambda: persist_once(membership, store)),
            name="registry.persister",
        )
    )
    log.info(
        "registry.configured",
        store=store.where,
        restored=restored,
        lease_ttl_s=settings.lease_ttl_s,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        metrics_address=settings.metrics_address or None,
        rollouts=len(traffic.rollouts),
        experiments=len(traffic.experiments),
    )
    return app

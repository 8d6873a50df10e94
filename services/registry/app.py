"""Registry process wiring: the database, the membership restored from it, the reaper, the persister, the server."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import structlog
from fleetserve.registry.v1 import registry_service_pb2 as pb
from opentelemetry.metrics import CallbackOptions, Observation

from services.registry.config import RegistrySettings
from services.registry.membership import Membership
from services.registry.servicer import RegistryServicer
from services.registry.store import ReplicaStore
from shared.server import RunningServer, Service, cancel_and_wait, create_server, drain_and_stop
from shared.telemetry import Telemetry

log = structlog.get_logger(__name__)


def reap_once(servicer: RegistryServicer) -> list[str]:
    """Remove replicas whose lease ended, from memory (watchers see REMOVED) and from the database."""
    membership = servicer.membership
    expired = membership.expire()
    if expired:
        servicer.store.delete(expired)
        servicer.count_change("expired", len(expired))
        for rid in expired:
            log.warning("registry.replica_expired", replica_id=rid, lease_ttl_s=membership.lease_ttl_s)
    return expired


def persist_once(membership: Membership, store: ReplicaStore) -> int:
    """Write the load of every replica heartbeated since the last call, in one transaction."""
    return store.save_heartbeats(membership.take_dirty())


async def _every(interval_s: float, name: str, fn) -> None:
    """Call fn every interval_s until cancelled; an error is logged and the loop goes on."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            fn()
        except Exception:  # a failing tick (disk full, say) must not stop leases from expiring later
            log.exception("registry.background_error", task=name)


@dataclass
class RegistryApp:
    """A started registry."""

    running: RunningServer
    servicer: RegistryServicer
    membership: Membership
    store: ReplicaStore
    tasks: list[asyncio.Task] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.running.address

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING, end the watches, let other RPCs finish within grace_s, then flush heartbeats and close
        the database."""

        async def before_stop() -> None:
            # Watches never end by themselves; ending them now lets watchers reconnect elsewhere at once.
            self.membership.close_watchers()

        async def after_stop() -> None:
            await cancel_and_wait(self.tasks)
            persist_once(self.membership, self.store)
            self.store.close()

        await drain_and_stop(self.running, grace_s, before_stop=before_stop, after_stop=after_stop)


async def start(settings: RegistrySettings, telemetry: Telemetry) -> RegistryApp:
    """Open the database, restore its replicas with fresh leases, then serve and start reaping."""
    store = ReplicaStore(settings.db_path)
    try:
        membership = Membership(settings.lease_ttl_s, watch_queue_size=settings.watch_queue_size)
        restored = membership.restore(store.load_all())
        servicer = RegistryServicer(
            membership,
            store,
            telemetry.tracer,
            telemetry.meter,
            lease_ttl_s=settings.lease_ttl_s,
            heartbeat_interval_s=settings.heartbeat_interval_s,
        )

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
            [Service(pb, "RegistryService", servicer, relay_bytes=frozenset({"WatchReplicas"}))],
            settings.host,
            settings.port,
        )
    except BaseException:
        store.close()
        raise
    app = RegistryApp(running, servicer, membership, store)
    app.tasks.append(
        asyncio.create_task(
            _every(settings.reaper_interval_s, "reaper", lambda: reap_once(servicer)), name="registry.reaper"
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
        db_path=settings.db_path,
        restored=restored,
        lease_ttl_s=settings.lease_ttl_s,
        heartbeat_interval_s=settings.heartbeat_interval_s,
    )
    return app

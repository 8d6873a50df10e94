"""Router process wiring: membership watch on the registry, the policy, the engine channels and the server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import grpc
import structlog
from fleetserve.common.v1 import common_pb2
from fleetserve.registry.v1 import registry_service_pb2 as reg_pb
from fleetserve.registry.v1 import registry_service_pb2_grpc as reg_grpc
from fleetserve.registry.v1 import rollout_service_pb2 as rollout_pb
from fleetserve.registry.v1 import rollout_service_pb2_grpc as rollout_grpc
from fleetserve.router.v1 import router_service_pb2 as pb
from prometheus_client.registry import CollectorRegistry

from services.engine.registration import Registration
from services.router import policy_set
from services.router.breakers import BreakerSettings
from services.router.config import RouterSettings
from services.router.membership import Membership
from services.router.outliers import OutlierSettings
from services.router.router_metrics import RouterMetrics
from services.router.servicer import RetrySettings, RouterServicer
from services.router.stalls import StallSettings
from shared import prom
from shared.channels import ChannelPool, open_channel
from shared.recycle import recycler
from shared.server import RunningServer, Service, cancel_and_wait, create_server, drain_and_stop
from shared.telemetry import Telemetry
from shared.tls import Tls
from shared.workers import siblings_serve

log = structlog.get_logger(__name__)


@dataclass
class RouterApp:
    """A started router."""

    running: RunningServer
    servicer: RouterServicer
    membership: Membership
    pool: ChannelPool
    registry_channel: grpc.aio.Channel
    tasks: list[asyncio.Task] = field(default_factory=list)
    # Its own entry in the registry (role ROUTER), by which gateways discover it.
    registration: Registration | None = None
    # Asked when the drain starts: whether sibling workers go on serving our ports (shared/workers.py).
    siblings_serve: Callable[[], bool] = lambda: False

    @property
    def address(self) -> str:
        return self.running.address

    @property
    def metrics_registry(self) -> CollectorRegistry:
        """The router's Prometheus series (served on its /metrics)."""
        return self.servicer.prom.registry

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING, let in-flight streams finish within grace_s, then stop watching and close channels."""

        async def after_stop() -> None:
            if self.registration is not None:
                await self.registration.close()
            await close_router(self.servicer, self.registry_channel, self.tasks)

        hand_over = self.siblings_serve()

        async def before_stop() -> None:
            # DRAINING first: discovering gateways send nothing new here while the streams in flight finish.
            if self.registration is not None:
                await self.registration.drain()
            # New requests get UNAVAILABLE + RetryInfo (served, when sibling workers take our clients over: they
            # reached us on a connection opened before the GOAWAY); streams still running near the end of
            # grace_s are cut with UNAVAILABLE SHUTTING_DOWN + RetryInfo (a gateway with other routers moves
            # them there).
            await self.servicer.drain.run(grace_s, serve_new=hand_over)

        await drain_and_stop(
            self.running,
            grace_s,
            before_stop=before_stop,
            after_stop=after_stop,
            goaway_first=hand_over,
            idle=self.servicer.drain.idle,
        )


def registration(settings: RouterSettings, running: RunningServer, servicer: RouterServicer) -> Registration:
    """The router's own registry entry (role ROUTER), heartbeating its in-flight count as its load. The engine's
    registration client: a router registers, heartbeats, re-registers and drains exactly as an engine does."""
    port = int(running.address.rsplit(":", 1)[1])
    # Bound to every interface (a pod): register an address others can dial, not 0.0.0.0.
    address = settings.advertised_address(port)
    host = address.rsplit(":", 1)[0]
    rid = settings.router_id or f"router-{host}-{port}"
    if settings.worker_count > 1:
        # Each worker of a `--workers N` router is a router of its own to gateways (its own port, its own
        # cache_aware state): affinity must pick a worker, so each registers.
        rid = f"{rid}-w{settings.worker_index}"
    replica = reg_pb.Replica(
        replica_id=rid,
        address=address,
        backend="router",
        role=reg_pb.REPLICA_ROLE_ROUTER,
    )
    return Registration(
        settings.registry_address,
        replica,
        lambda: common_pb2.ReplicaLoad(running=sum(servicer.in_flight.values())),
        tls=Tls.from_settings(settings),
    )


def build_servicer(
    settings: RouterSettings, telemetry: Telemetry, metrics: RouterMetrics | None = None
) -> RouterServicer:
    """A router's servicer with everything its settings ask for (policies, breakers, outliers, stalls, admission),
    its channels opened with its TLS; metrics on their own registry unless given (a gateway with an embedded
    router puts them on its own). Nothing is watched yet (watch)."""
    membership = Membership(
        cooldown_s=settings.unroutable_cooldown_s, forget_model_after_s=settings.forget_model_after_s
    )
    tls = Tls.from_settings(settings)
    pool = ChannelPool(tls)
    metrics = metrics or RouterMetrics(prom.new_registry())
    servicer = RouterServicer(
        membership,
        policy_set.from_settings(settings, lambda address: open_channel(address, tls), metrics.kv_events),
        pool,
        telemetry.tracer,
        meter=telemetry.meter,
        prom_metrics=metrics,
        default_timeout_s=settings.default_timeout_s,
        ready_wait_s=settings.ready_wait_s,
        retry=RetrySettings(
            max_attempts=settings.max_attempts,
            backoff_base_s=settings.retry_backoff_base_s,
            backoff_max_s=settings.retry_backoff_max_s,
            resume=settings.resume,
            hedge_delay_s=settings.hedge_delay_s,
            hedge_delay_by_model=settings.hedge_delay_by_model(),
        ),
        outliers=OutlierSettings(
            enabled=settings.outlier_detection,
            min_samples=settings.outlier_min_samples,
            min_peers=settings.outlier_min_peers,
            ttft_factor=settings.outlier_ttft_factor,
            ttft_min_gap_ms=settings.outlier_ttft_min_gap_ms,
            error_rate_gap=settings.outlier_error_rate_gap,
            eject_s=settings.outlier_eject_s,
            max_ejected_fraction=settings.outlier_max_ejected_fraction,
        ),
        breakers=BreakerSettings(
            failure_threshold=settings.breaker_failure_threshold,
            open_s=settings.breaker_open_s,
            max_open_s=max(settings.breaker_open_s, settings.breaker_max_open_s),
        ),
        retry_budget_max_tokens=settings.retry_budget_max_tokens,
        retry_budget_token_ratio=settings.retry_budget_token_ratio,
        max_in_flight_per_replica=settings.max_in_flight_per_replica,
        frontend_pack=settings.frontend_pack_per_worker,
        wake_models=settings.wake_model_set,
        queue_max_waiting=settings.queue_max_waiting,
        queue_retry_after_s=settings.queue_retry_after_s,
        coalesce=settings.coalesce,
        stalls=StallSettings(
            enabled=settings.stall_detection,
            check_interval_s=settings.stall_check_interval_s,
            min_silence_s=settings.stall_min_silence_s,
            itl_factor=settings.stall_itl_factor,
            first_token_s=settings.stall_first_token_s,
            ttft_factor=settings.stall_ttft_factor,
            probe_after_s=settings.stall_probe_after_s,
            probe_timeout_s=settings.stall_probe_timeout_s,
            probe_streaming_s=settings.stall_probe_streaming_s,
            probe_itl_factor=settings.stall_probe_itl_factor,
        ),
    )
    servicer.recycler = recycler(settings)
    return servicer


def watch(settings: RouterSettings, servicer: RouterServicer) -> tuple[grpc.aio.Channel, list[asyncio.Task]]:
    """Start following the registry: membership (WatchReplicas), traffic splits (WatchTraffic) and, when on, the
    stall watchdog. The registry channel and the tasks: the caller closes and cancels them (close_router)."""
    registry_channel = open_channel(settings.registry_address, Tls.from_settings(settings))
    registry = reg_grpc.RegistryServiceStub(registry_channel)
    rollouts = rollout_grpc.RolloutServiceStub(registry_channel)

    def open_traffic():
        return rollouts.WatchTraffic(rollout_pb.WatchTrafficRequest(), timeout=settings.watch_resubscribe_s)

    def open_watch():
        # A long but finite watch: every RPC has a deadline, and a periodic resubscribe (fresh snapshot)
        # bounds how long a missed event could leave the view wrong.
        return registry.WatchReplicas(reg_pb.WatchReplicasRequest(), timeout=settings.watch_resubscribe_s)

    tasks = [
        asyncio.create_task(
            servicer.membership.watch(
                open_watch, settings.watch_backoff_base_s, settings.watch_backoff_max_s
            ),
            name="router.watch",
        ),
        asyncio.create_task(
            servicer.traffic.watch(open_traffic, settings.watch_backoff_base_s, settings.watch_backoff_max_s),
            name="router.traffic_watch",
        ),
    ]
    if settings.stall_detection:
        tasks.append(asyncio.create_task(servicer.watch_stalls(), name="router.stalls"))
    return registry_channel, tasks


async def close_router(
    servicer: RouterServicer, registry_channel: grpc.aio.Channel, tasks: list[asyncio.Task]
) -> None:
    """Stop watching, then close shadows, KV-event subscriptions and channels."""
    await cancel_and_wait(tasks)
    await servicer.close()
    await servicer.policy.close()  # KV-event subscriptions of kv_aware
    await registry_channel.close(grace=None)
    await servicer.pool.close()


async def start(settings: RouterSettings, telemetry: Telemetry) -> RouterApp:
    """Start the router: serve at once, report SERVING once the first registry snapshot has arrived."""
    servicer = build_servicer(settings, telemetry)
    running = await create_server(
        # ListModels and GetStatus count as busy in the drain (it waits for them).
        [Service(pb, "RouterService", servicer, relay_bytes=frozenset({"Generate"}), drain=servicer.drain)],
        settings.host,
        settings.port,
        reuse_port=settings.worker_index >= 0,
        private_port=settings.worker_port,
        tls=Tls.from_settings(settings),
    )
    # Until the registry has told us who serves what, every request would fail: say so to health probes.
    await running.set_serving(False)
    registry_channel, tasks = watch(settings, servicer)
    app = RouterApp(running, servicer, servicer.membership, servicer.pool, registry_channel, tasks)
    app.siblings_serve = partial(siblings_serve, settings)
    app.tasks.append(asyncio.create_task(serving_once_ready(running, servicer), name="router.ready"))
    if settings.register_in_registry:
        app.registration = registration(settings, running, servicer)
        app.registration.start()
    log.info("router.configured", registry=settings.registry_address, policy=settings.policy)
    return app


async def serving_once_ready(running: RunningServer, servicer: RouterServicer) -> None:
    """SERVING once the registry's first membership snapshot and traffic configuration have come: without the
    traffic splits a request could reach a version rolled back or not yet rolled out."""
    await asyncio.gather(servicer.membership.ready.wait(), servicer.traffic.ready.wait())
    await running.set_serving(True)
    log.info(
        "router.membership_ready",
        replicas=len(servicer.membership.replicas()),
        models=servicer.membership.models(),
    )

"""Gateway process wiring: the databases (SQLite files or PostgreSQL), the router channel and the server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import structlog
from fleetserve.inference.v1 import inference_service_pb2 as pb
from prometheus_client.registry import CollectorRegistry

from services.gateway.bootstrap import configured_key, show_generated_key
from services.gateway.config import GatewaySettings
from services.gateway.db import redact
from services.gateway.embedded_router import EmbeddedRouter, router_settings
from services.gateway.feedback import FeedbackStore
from services.gateway.http.server import OpenAIServer
from services.gateway.jobs import JobRunner, JobStore
from services.gateway.pipeline import GatewayPipeline
from services.gateway.request_metrics import GatewayMetrics
from services.gateway.routers import RouterPool
from services.gateway.schema import Databases, open_databases
from services.gateway.servicer import GatewayServicer
from services.gateway.tenants import TenantStore
from shared import prom
from shared.channels import ChannelPool
from shared.recycle import recycler
from shared.server import RunningServer, Service, create_server, drain_and_stop
from shared.telemetry import Telemetry
from shared.tls import Tls
from shared.workers import siblings_serve

log = structlog.get_logger(__name__)


@dataclass
class GatewayApp:
    """A started gateway."""

    running: RunningServer
    servicer: GatewayServicer
    tenants: TenantStore
    pool: ChannelPool
    databases: Databases
    jobs: JobRunner | None = None
    http: OpenAIServer | None = None
    # This gateway's Prometheus instruments (served on its /metrics).
    metrics_registry: CollectorRegistry | None = None
    # Asked when the drain starts: whether sibling workers go on serving our ports (shared/workers.py).
    siblings_serve: Callable[[], bool] = lambda: False
    # --embedded-router: the router in this process (the pipeline's routers).
    embedded: EmbeddedRouter | None = None

    @property
    def http_address(self) -> str:
        """host:port of the OpenAI-compatible HTTP server ("" when it is off)."""
        return self.http.address if self.http is not None else ""

    @property
    def ready_info(self) -> dict[str, str]:
        """Extra fields of the ready file: where launchers find the HTTP port (and the embedded router's)."""
        info = {"http_address": self.http_address}
        if self.embedded is not None:
            info["router_address"] = self.embedded.address
        return info

    @property
    def address(self) -> str:
        return self.running.address

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING, let in-flight streams finish within grace_s, then close the router channel and the db."""

        http_stopped: asyncio.Task | None = None
        hand_over = self.siblings_serve()
        started = time.monotonic()

        async def before_stop() -> None:
            nonlocal http_stopped
            if self.embedded is not None:
                await self.embedded.drain()  # gateways discovering routers send its port nothing new
            if hand_over and self.http is not None:
                # Sibling workers serve our ports: HTTP clients go to them as well (listener closed now, each
                # response from here on says Connection: close), as gRPC clients do on GOAWAY.
                await self.http.hand_over()
            # Jobs pause at once: their unfinished items stay in the database and resume on the next start.
            if self.jobs is not None:
                await self.jobs.stop()
            # Streams may finish until shortly before grace_s ends, the rest are cut with SHUTTING_DOWN. New
            # requests meanwhile get UNAVAILABLE + RetryInfo (both ports stay open) unless we hand over: then
            # the ones still reaching us, on a connection opened before, are served.
            await self.servicer.pipeline.drain.run(grace_s, serve_new=hand_over)
            if hand_over and self.http is not None:
                # Keep-alive clients still on a connection here send it one more request (served, and the
                # connection closed after it) before the drain's cut time; idle ones are closed.
                await self.http.let_clients_go(until=started + self.servicer.pipeline.drain.cut_at(grace_s))
            if self.http is not None:
                http_stopped = asyncio.create_task(self.http.stop(min(grace_s, 1.0)))

        async def after_stop() -> None:
            if http_stopped is not None:
                await http_stopped
            await self.servicer.pipeline.close(min(grace_s, 1.0))
            await self.servicer.pipeline.routers.close()  # the embedded router's too
            await self.pool.close()
            await self.databases.close()

        await drain_and_stop(
            self.running,
            grace_s,
            before_stop=before_stop,
            after_stop=after_stop,
            goaway_first=hand_over,
            idle=self.servicer.pipeline.drain.idle,
        )


async def start(settings: GatewaySettings, telemetry: Telemetry) -> GatewayApp:
    """Open (and migrate, and on first start bootstrap) the databases, then serve."""
    tls = Tls.from_settings(settings)  # unreadable files fail the start, naming the file
    dbs = await open_databases(
        settings.db_url, settings.db_path, settings.jobs_db_path, pool_size=settings.db_pool_size
    )
    tenants = TenantStore(
        dbs.accounts, cache_ttl_s=settings.auth_cache_ttl_s, version_poll_s=settings.config_poll_s
    )
    app: GatewayApp | None = None
    pipeline: GatewayPipeline | None = None
    try:
        created = await tenants.bootstrap(
            configured_key(settings.bootstrap_api_key, settings.bootstrap_api_key_file)
        )
        if created:
            show_generated_key(created)
        pool = ChannelPool(tls)
        registry = prom.new_registry()
        embedded: EmbeddedRouter | None = None
        routers: RouterPool | EmbeddedRouter
        if settings.embedded_router:
            routers = embedded = EmbeddedRouter(router_settings(settings), telemetry, registry)
            await embedded.start()
        else:
            routers = RouterPool(
                pool,
                settings.router_addresses(),
                down_s=settings.router_down_s,
                resume=settings.router_resume,
                coalesce=settings.coalesce,
            )
            if settings.registry_address:
                routers.start_discovery(settings.registry_address)
        pipeline = GatewayPipeline.from_settings(
            settings,
            tenants,
            routers,
            telemetry.tracer,
            telemetry.meter,
            GatewayMetrics(registry, tenant_label=settings.metrics_tenant_label),
        )
        pipeline.recycler = recycler(settings)
        pipeline.start()
        feedback = FeedbackStore(dbs.jobs, telemetry.tracer, telemetry.meter, pipeline.recent)
        jobs = JobRunner(
            JobStore(dbs.jobs),
            pipeline,
            tenants,
            job_concurrency=settings.job_concurrency,
            tenant_concurrency=settings.job_tenant_concurrency,
            max_items=settings.job_max_items,
            attempts=settings.job_item_attempts,
            max_wait_s=settings.job_item_max_wait_s,
            lease_s=settings.job_lease_s,
            poll_s=settings.job_poll_s,
        )
        servicer = GatewayServicer(pipeline, jobs, feedback)
        running = await create_server(
            # ListModels, Feedback and the job RPCs count as busy in the drain (it waits for them).
            [
                Service(
                    pb,
                    "InferenceService",
                    servicer,
                    relay_bytes=frozenset({"Generate", "Chat"}),
                    drain=pipeline.drain,
                )
            ],
            settings.host,
            settings.port,
            # Refused by gRPC before the message is parsed: RESOURCE_EXHAUSTED, "received message larger than max".
            options=(("grpc.max_receive_message_length", settings.max_request_bytes),),
            reuse_port=settings.worker_index >= 0,
            private_port=settings.worker_port,
            # The public port: clients are authenticated by API key, not certificate.
            tls=tls,
            client_auth=False,
        )
        app = GatewayApp(running, servicer, tenants, pool, dbs, jobs, None, registry, embedded=embedded)
        app.siblings_serve = partial(siblings_serve, settings)
        if settings.http_port >= 0:
            # The same size limit as gRPC's (over HTTP: 413 before the body is read in full).
            app.http = OpenAIServer(pipeline, max_body_bytes=settings.max_request_bytes)
            await app.http.start(
                settings.host,
                settings.http_port,
                reuse_port=settings.worker_index >= 0,
                ssl_context=tls.server_ssl_context() if tls is not None else None,
            )
    except BaseException:
        if app is not None:  # the HTTP port could not be bound: the gRPC server is up already
            await app.running.server.stop(0)
        if pipeline is not None:
            await pipeline.close()
            await pipeline.routers.close()
        elif embedded is not None:
            await embedded.close(0)
        await dbs.close()
        raise
    # Jobs are leased in the database, so every worker scans for them, as several gateways do.
    jobs.start()
    log.info(
        "gateway.configured",
        routers=embedded.address if embedded is not None else settings.router_addresses(),
        router_discovery=bool(settings.registry_address) and embedded is None,
        database=redact(settings.db_url) if settings.db_url else settings.db_path,
        shared_state=dbs.shared,
        job_runner=jobs.owner,
        http=app.http_address,
    )
    return app

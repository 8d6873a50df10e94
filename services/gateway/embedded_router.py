"""gateway --embedded-router: a full router (services/router) built inside the gateway worker process, called
without a gRPC hop, and served on an internal port of its own (RouterService) for the autoscaler and metrics."""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Callable

import grpc
import structlog
from fleetserve.router.v1 import router_service_pb2 as router_pb
from prometheus_client.registry import CollectorRegistry

from services.engine.registration import Registration
from services.gateway.config import GatewaySettings
from services.gateway.embedded_stream import CallContext, EmbeddedStream
from services.router.app import build_servicer, close_router, registration, serving_once_ready, watch
from services.router.config import RouterSettings
from services.router.policy_set import parse_mapping
from services.router.router_metrics import RouterMetrics
from shared.errors import DeadlineExceeded
from shared.server import RunningServer, Service, cancel_and_wait, create_server
from shared.settings import load_settings
from shared.telemetry import Telemetry
from shared.tls import Tls

log = structlog.get_logger(__name__)

# cache_aware's wider ties, unless --router-flags set them: every gateway worker (and every gateway) has a router
# of its own and sees some of a conversation's turns, each counting only its own requests in flight; ties within
# one request's worth, broken by the conversation's affinity key, put its turns on one replica anyway
# (measured in docs/benchmarks/router_affinity.md).
EMBEDDED_POLICY_OPTIONS = {"cache_aware.tie_tokens": "256", "cache_aware.tie_load": "1"}


def router_settings(gateway: GatewaySettings) -> RouterSettings:
    """The embedded router's settings: the router's own flags (--router-flags) and FLEETSERVE_ROUTER_* env, over
    what it takes from the gateway (its registry, its TLS, its worker index); exits 2 on bad values, as a router
    would."""
    args: list[str] = []
    if gateway.registry_address:
        args += ["--registry-address", gateway.registry_address]
    if gateway.tls_cert:
        args += ["--tls-cert", gateway.tls_cert, "--tls-key", gateway.tls_key]
    if gateway.tls_ca:
        args += ["--tls-ca", gateway.tls_ca]
    if gateway.tls_server_name:
        args += ["--tls-server-name", gateway.tls_server_name]
    if gateway.port:
        # Named for the gateway's port (its router's is a free one each start): a restarted worker's router comes
        # back under the same registry id, at its new address.
        args += ["--router-id", f"gateway-{gateway.host}-{gateway.port}"]
    if gateway.worker_index >= 0:
        # Each worker's router registers as one of its own (-w<i>) and packs its share of --frontend-pack.
        args += ["--worker-index", str(gateway.worker_index), "--worker-count", str(gateway.worker_count)]
    # Given last: an explicit router flag wins over what the gateway passed.
    settings = load_settings(RouterSettings, args + shlex.split(gateway.router_flags))
    options = {**EMBEDDED_POLICY_OPTIONS, **parse_mapping(settings.policy_options)}
    return settings.model_copy(update={"policy_options": ",".join(f"{k}={v}" for k, v in options.items())})


class EmbeddedRouter:
    """The router of this gateway worker, in the shape the pipeline calls (RouterPool's generate and unary)."""

    def __init__(self, settings: RouterSettings, telemetry: Telemetry, registry: CollectorRegistry) -> None:
        self.settings = settings
        # Its series on the gateway's registry: one /metrics per process (router names differ from gateway's).
        self.servicer = build_servicer(settings, telemetry, RouterMetrics(registry))
        self.running: RunningServer | None = None
        self.registration: Registration | None = None
        self._channel: grpc.aio.Channel | None = None
        self._tasks: list[asyncio.Task] = []

    @property
    def membership(self):
        """The replicas it routes to (the registry's view, as a router's)."""
        return self.servicer.membership

    @property
    def address(self) -> str:
        """Its internal RouterService port ("embedded" before it serves): what spans and logs name as the router."""
        return self.running.address if self.running is not None else "embedded"

    async def start(self) -> None:
        """Watch the registry, serve RouterService on the router's --host/--port (mTLS like a router's port), and
        register there as a router (unless --no-register-in-registry)."""
        settings = self.settings
        self._channel, self._tasks = watch(settings, self.servicer)
        self.running = await create_server(
            [
                Service(
                    router_pb,
                    "RouterService",
                    self.servicer,
                    relay_bytes=frozenset({"Generate"}),
                    drain=self.servicer.drain,
                )
            ],
            settings.host,
            settings.port,
            tls=Tls.from_settings(settings),
        )
        await self.running.set_serving(False)
        self._tasks.append(asyncio.create_task(serving_once_ready(self.running, self.servicer)))
        if settings.register_in_registry:
            self.registration = registration(settings, self.running, self.servicer)
            self.registration.start()
        log.info(
            "gateway.embedded_router",
            address=self.running.address,
            registry=settings.registry_address,
            policy=settings.policy,
        )

    def generate(
        self,
        request: router_pb.GenerateRequest,
        *,
        deadline: float,
        metadata=None,
        attempt: Callable[[str], None] | None = None,
        sent: Callable[[], None] | None = None,
    ) -> EmbeddedStream:
        """The router's GenerateResponse bytes for request, from this process's router (see EmbeddedStream)."""
        return EmbeddedStream(self.servicer, self.address, request, deadline, metadata, attempt, sent)

    async def unary(self, method: str, request, *, timeout_s: float, metadata=None):
        """ListModels or GetStatus ("list_models", "get_status") of this router; its FleetErrors as they are."""
        context = CallContext(metadata, time.monotonic() + timeout_s)
        try:
            async with asyncio.timeout(timeout_s):
                # The servicer's list_models / get_status: its FleetErrors as they are, no rpc_boundary.
                return await getattr(self.servicer, method)(request, context)
        except TimeoutError:
            raise DeadlineExceeded(f"the router's {method} took longer than {timeout_s:.3f} s") from None

    async def drain(self) -> None:
        """DRAINING in the registry: gateways that discover routers there send it nothing new."""
        if self.registration is not None:
            await self.registration.drain()

    async def close(self, grace_s: float = 1.0) -> None:
        """Stop its port (streams other gateways still have on it get grace_s), leave the registry, stop watching."""
        if self.running is not None:
            await self.running.set_serving(False)
            await self.running.server.stop(grace_s)
        if self.registration is not None:
            await self.registration.close()
        if self._channel is not None:
            await close_router(self.servicer, self._channel, self._tasks)
        else:
            await cancel_and_wait(self._tasks)

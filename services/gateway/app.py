"""Gateway process wiring: the tenants database, the router channel and the server."""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from fleetserve.inference.v1 import inference_service_pb2 as pb

from services.gateway.config import GatewaySettings
from services.gateway.pipeline import GatewayPipeline
from services.gateway.servicer import GatewayServicer
from services.gateway.tenants import TenantStore
from shared.channels import ChannelPool
from shared.server import RunningServer, Service, create_server, drain_and_stop
from shared.telemetry import Telemetry

log = structlog.get_logger(__name__)


@dataclass
class GatewayApp:
    """A started gateway."""

    running: RunningServer
    servicer: GatewayServicer
    tenants: TenantStore
    pool: ChannelPool

    @property
    def address(self) -> str:
        return self.running.address

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING, let in-flight streams finish within grace_s, then close the router channel and the db."""

        async def after_stop() -> None:
            await self.pool.close()
            self.tenants.close()

        await drain_and_stop(self.running, grace_s, after_stop=after_stop)


async def start(settings: GatewaySettings, telemetry: Telemetry) -> GatewayApp:
    """Open (and on first start, bootstrap) the tenants database, then serve."""
    tenants = TenantStore(settings.db_path, cache_ttl_s=settings.auth_cache_ttl_s)
    try:
        tenants.bootstrap(settings.bootstrap_api_key)
        pool = ChannelPool()
        pipeline = GatewayPipeline(
            tenants,
            pool.get(settings.router_address),
            telemetry.tracer,
            telemetry.meter,
            default_deadline_s=settings.default_deadline_s,
            default_max_tokens=settings.default_max_tokens,
            max_tokens_limit=settings.max_tokens_limit,
            list_models_timeout_s=settings.list_models_timeout_s,
        )
        servicer = GatewayServicer(pipeline)
        running = await create_server(
            [Service(pb, "InferenceService", servicer, relay_bytes=frozenset({"Generate"}))],
            settings.host,
            settings.port,
        )
    except BaseException:
        tenants.close()
        raise
    log.info("gateway.configured", router=settings.router_address, db_path=settings.db_path)
    return GatewayApp(running, servicer, tenants, pool)

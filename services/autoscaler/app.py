"""Autoscaler process wiring: channels to the registry, routers and metrics service, the provisioner, the
control loop on its interval, and a gRPC server for health (grpc.health.v1) and reflection."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
import structlog

from services.autoscaler.config import AutoscalerSettings
from services.autoscaler.loop import Autoscaler
from services.autoscaler.provisioner import Provisioner, make_provisioner
from services.autoscaler.router_directory import RouterDirectory
from shared.channels import open_channel
from shared.server import RunningServer, cancel_and_wait, create_server, drain_and_stop
from shared.telemetry import Telemetry
from shared.tls import Tls

log = structlog.get_logger(__name__)


async def run_every(interval_s: float, autoscaler: Autoscaler) -> None:
    """Decide every interval_s until cancelled; a failing round is logged and the next one runs."""
    while True:
        try:
            await autoscaler.tick()
        except Exception:  # one bad round (a registry hiccup, say) must not stop scaling for good
            log.exception("autoscaler.tick_failed")
        await asyncio.sleep(interval_s)


@dataclass
class AutoscalerApp:
    """A started autoscaler."""

    running: RunningServer
    autoscaler: Autoscaler
    provisioner: Provisioner
    channels: list[grpc.aio.Channel]
    tasks: list[asyncio.Task] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.running.address

    async def stop(self, grace_s: float) -> None:
        """Stop deciding, then drain and stop the replicas this autoscaler started (local provisioner)."""

        async def before_stop() -> None:
            await cancel_and_wait(self.tasks)
            await self.provisioner.close(self.autoscaler.drain)

        async def after_stop() -> None:
            await self.autoscaler.routers.close()
            for ch in self.channels:
                await ch.close(grace=None)

        await drain_and_stop(self.running, grace_s, before_stop=before_stop, after_stop=after_stop)


async def start(settings: AutoscalerSettings, telemetry: Telemetry) -> AutoscalerApp:
    tls = Tls.from_settings(settings)
    registry = open_channel(settings.registry_address, tls)
    metrics_ch = open_channel(settings.metrics_address, tls) if settings.metrics_address else None
    provisioner = make_provisioner(
        settings.provisioner,
        registry_address=settings.registry_address,
        data_dir=settings.data_dir,
        engine_args=settings.engine_args,
        grace_s=settings.grace_period_s,
    )
    routers = RouterDirectory(settings.routers, registry, discovery=settings.router_discovery, tls=tls)
    autoscaler = Autoscaler(
        settings.specs,
        provisioner,
        registry,
        routers,
        metrics_ch,
        telemetry.meter,
        window_s=settings.window_s,
        drain_timeout_s=settings.drain_timeout_s,
        start_timeout_s=settings.start_timeout_s,
        decisions_kept=settings.decisions_kept,
        watch_resubscribe_s=settings.watch_resubscribe_s,
        watch_backoff_base_s=settings.watch_backoff_base_s,
        watch_backoff_max_s=settings.watch_backoff_max_s,
    )
    await autoscaler.restore()
    running = await create_server([], settings.host, settings.port, tls=tls)
    channels = [registry, *([metrics_ch] if metrics_ch else [])]
    app = AutoscalerApp(running, autoscaler, provisioner, channels)
    # Started before the loop, so the first round finds the configuration (or waits a little for it).
    app.tasks.append(asyncio.create_task(autoscaler.watch_traffic(), name="autoscaler.traffic_watch"))
    app.tasks.append(asyncio.create_task(run_every(settings.interval_s, autoscaler), name="autoscaler.loop"))
    log.info(
        "autoscaler.configured",
        models={
            s.model: {"min": s.min_replicas, "max": s.max_replicas, "policies": list(s.policies)}
            for s in settings.specs
        },
        provisioner=settings.provisioner,
        interval_s=settings.interval_s,
    )
    return app

"""Engine process wiring: the backend, the gRPC server, and the registration that keeps it in the fleet."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import prometheus_client
import structlog
from fleetserve.engine.v1 import engine_service_pb2 as pb
from fleetserve.registry.v1 import registry_service_pb2 as reg_pb
from prometheus_client.registry import CollectorRegistry

from services.engine.backend import EngineBackend
from services.engine.config import EngineSettings
from services.engine.engine_metrics import EngineMetrics, vllm_metrics_registered
from services.engine.frontends import Frontend
from services.engine.gauges import EngineGauges
from services.engine.registration import Registration
from services.engine.servicer import EngineServicer
from services.engine.sim import SimEngine
from shared import prom
from shared.recycle import recycler
from shared.server import RunningServer, Service, cancel_and_wait, create_server, drain_and_stop
from shared.telemetry import Telemetry
from shared.tls import Tls

log = structlog.get_logger(__name__)


def create_backend(settings: EngineSettings, frontend: Frontend | None = None) -> EngineBackend:
    """The backend named by settings.backend (for vllm, one front end of several when frontend is given)."""
    if settings.backend == "sim":
        profile = settings.gpu_profile
        return SimEngine(
            seed=settings.seed,
            speed_factor=settings.speed_factor,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            num_kv_blocks=settings.num_kv_blocks or profile.num_kv_blocks,
            max_model_len=settings.max_model_len or profile.max_model_len,
            enable_prefix_caching=settings.enable_prefix_caching,
            cost=settings.cost_model,
            kv_events_max_pending=settings.kv_events_max_pending,
            behaviour=settings.behaviour,
        )
    if settings.backend == "vllm":
        from services.engine.vllm_backend import VllmBackend, engine_argv

        return VllmBackend(
            engine_argv(
                settings.vllm_args,
                max_num_seqs=settings.max_num_seqs,
                max_num_batched_tokens=settings.max_num_batched_tokens,
            ),
            detokenize=settings.vllm_detokenize,
            replica_id=settings.replica_id,
            **(
                frontend.backend_options() if frontend is not None else {"kv_events": settings.vllm_kv_events}
            ),
        )
    raise ValueError(f"unknown backend {settings.backend!r}")


@dataclass
class EngineApp:
    """A started engine replica."""

    running: RunningServer
    backend: EngineBackend
    servicer: EngineServicer
    registration: Registration | None
    replica_id: str
    # This replica's Prometheus series (served on its /metrics).
    metrics_registry: CollectorRegistry | None = None
    _stopped: bool = False
    _death_watch: asyncio.Task | None = None

    def watch_backend_death(self) -> None:
        """A backend whose engine can die (vLLM's engine-core process) sets its `dead` event: the replica then
        reports NOT_SERVING and leaves the registry, so routers stop sending to it."""
        dead = getattr(self.backend, "dead", None)
        if isinstance(dead, asyncio.Event):
            self._death_watch = asyncio.get_running_loop().create_task(
                self._on_death(dead), name="engine.death_watch"
            )

    async def _on_death(self, dead: asyncio.Event) -> None:
        await dead.wait()
        log.error("engine.backend_dead", replica_id=self.replica_id, will="NOT_SERVING and deregister")
        await self.running.set_serving(False)
        if self.registration is not None:
            await self.registration.close()

    @property
    def address(self) -> str:
        return self.running.address

    async def stop(self, grace_s: float) -> None:
        """Drain in the registry (routers stop sending), let in-flight streams finish within grace_s, then
        shut the backend down (aborting what is left) and leave the registry. Later calls do nothing."""
        if self._stopped:
            return
        self._stopped = True
        if self._death_watch is not None:
            await cancel_and_wait([self._death_watch])

        async def before_stop() -> None:
            if self.registration is not None:
                await self.registration.drain()

        async def after_stop() -> None:
            await self.servicer.close()
            await self.backend.shutdown()
            if self.registration is not None:
                await self.registration.close()

        await drain_and_stop(self.running, grace_s, before_stop=before_stop, after_stop=after_stop)


def recycle_gate(registration: Registration) -> Callable[[], Awaitable[bool]]:
    """Whether a replica due for recycling may go now: only while another replica of its model and version
    serves, so that replicas of a model coming due together do not all leave at once. Going, it drains at once:
    routers stop sending, and the others, asking in turn, see it draining."""

    async def another_replica_serving() -> bool:
        if await registration.others_serving() == 0:
            return False
        await registration.drain()
        return True

    return another_replica_serving


async def model_cold_start(delay_s: float, replica_id: str, progress_every_s: float = 5.0) -> None:
    """Wait delay_s as a loading engine would (the sim's stand-in for weights onto the GPU and compilation),
    logging progress; the replica is neither serving nor registered meanwhile."""
    if delay_s <= 0:
        return
    # Someone starting an engine by hand may not expect the wait: the line says how to skip it.
    log.info("engine.loading", replica_id=replica_id, startup_s=round(delay_s, 3), skip_with="--startup-s 0")
    loop = asyncio.get_running_loop()
    end = loop.time() + delay_s
    while (left := end - loop.time()) > 0:
        await asyncio.sleep(min(progress_every_s, left))
        done = min(1.0, 1.0 - (end - loop.time()) / delay_s)
        log.info("engine.loading_progress", replica_id=replica_id, done=round(done, 2))


async def start(
    settings: EngineSettings, telemetry: Telemetry, frontend: Frontend | None = None
) -> EngineApp:
    """Start the backend and serve; register with the registry in the background (if one is configured).
    With `frontend`, this process is one of a replica's several front ends (services/engine/frontends.py): it
    learns its peers once all are bound, and only the primary registers (one replica, every endpoint)."""
    started_unix = time.time()
    tls = Tls.from_settings(settings)  # unreadable files fail the start before the model loads
    await model_cold_start(settings.startup_delay_s, settings.replica_id)
    backend = create_backend(settings, frontend)
    await backend.start()
    registry = prom.new_registry()
    try:
        # vLLM's own Prometheus series, when AsyncLLM registered them in this process, are served as they
        # are; otherwise (the sim) the worker keeps the same series itself.
        native = settings.backend == "vllm" and vllm_metrics_registered(prometheus_client.REGISTRY)
        servicer = EngineServicer(
            backend,
            replica_id=settings.replica_id,
            model=settings.model,
            model_version=settings.model_version,
            tracer=telemetry.tracer,
            meter=telemetry.meter,
            prom_metrics=None if native else EngineMetrics(registry, backend, settings.model),
        )
        port = settings.port + frontend.index if frontend is not None and settings.port else settings.port
        running = await create_server(
            [Service(pb, "EngineService", servicer, relay_bytes=frozenset({"SubscribeKvEvents"}))],
            settings.host,
            port,
            tls=tls,
            # A recycled replica's worker (shared/workers.py) binds the port its supervisor holds.
            reuse_port=frontend is None and settings.worker_index >= 0,
            private_port=settings.worker_port,
        )
        address = settings.advertised_address(running.port)
        endpoints: list[str] = []
        if frontend is not None:
            endpoints = await frontend.exchange(address)
            servicer.set_peers(address, endpoints, endpoints[0], tls)
    except BaseException:
        await backend.shutdown()
        raise
    primary = frontend is None or frontend.index == 0
    registration = None
    # The replica's gauges and registration come from one process (its primary front end) only.
    gauges = (
        EngineGauges(
            telemetry.meter,
            backend.load,
            replica_id=settings.replica_id,
            model=settings.model,
            model_version=settings.model_version,
            replica_type=settings.profile,
        )
        if primary
        else None
    )
    if settings.registry_address and gauges is not None:
        registration = Registration(
            settings.registry_address,
            reg_pb.Replica(
                replica_id=settings.replica_id,
                address=address,
                model=settings.model,
                backend=settings.backend,
                model_version=settings.model_version,
                started_unix=started_unix,
                endpoints=endpoints,
            ),
            gauges.sample,
            retry_base_s=settings.register_retry_base_s,
            retry_max_s=settings.register_retry_max_s,
            rpc_timeout_s=settings.registry_timeout_s,
            tls=tls,
        )
        registration.start()
    # --max-requests-per-worker: the replica goes only while another of its model serves (recycle_gate).
    servicer.recycler = recycler(settings, recycle_gate(registration) if registration is not None else None)
    log.info(
        "engine.configured",
        replica_id=settings.replica_id,
        model=settings.model,
        model_version=settings.model_version,
        backend=settings.backend,
        frontend=None if frontend is None else frontend.index,
        frontends=len(endpoints) or 1,
        speed_factor=settings.speed_factor,
        sim_behaviour=settings.sim_behaviour or None,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        num_kv_blocks=backend.info().kv_blocks_total,
        profile=settings.profile if settings.backend == "sim" else None,
        registry=settings.registry_address or None,
        vllm_native_metrics=native,
    )
    app = EngineApp(running, backend, servicer, registration, settings.replica_id, registry)
    app.watch_backend_death()
    return app

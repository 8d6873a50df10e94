"""Server helpers: create a gRPC server with health and reflection on port 0, run it until SIGTERM, drain."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

import grpc
import structlog
from google.protobuf import message_factory
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared.request_decoding import RequestDecodingGuard
from shared.tls import Tls

if TYPE_CHECKING:
    from shared.drain import Drain

log = structlog.get_logger("fleetserve.server")

SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
)


@dataclass(frozen=True)
class Service:
    """A servicer to mount: its pb2 module, the service's short name, and methods whose responses it
    yields as already-serialized bytes (relaying hops), so they are not parsed and re-encoded. With a drain,
    its methods with one response are counted busy in it while they run (Drain.counted); its streams count
    themselves where they are admitted (Drain.check ... done)."""

    pb2: ModuleType
    name: str
    servicer: object
    relay_bytes: frozenset[str] = field(default_factory=frozenset)
    drain: Drain | None = None

    @property
    def full_name(self) -> str:
        return self.pb2.DESCRIPTOR.services_by_name[self.name].full_name


def _handlers(svc: Service) -> grpc.GenericRpcHandler:
    # Built from the descriptor rather than the generated add_*_to_server so that relaying methods can
    # skip response serialization (grpc passes bytes through when the serializer is None).
    desc = svc.pb2.DESCRIPTOR.services_by_name[svc.name]
    handlers = {}
    for m in desc.methods:
        req = message_factory.GetMessageClass(m.input_type)
        resp = message_factory.GetMessageClass(m.output_type)
        serializer = None if m.name in svc.relay_bytes else resp.SerializeToString
        fn = getattr(svc.servicer, m.name)
        if svc.drain is not None and not m.server_streaming:
            # Wrapped once here, not per call; a stream is not (a wrapper would cost it a frame per chunk).
            fn = svc.drain.counted(fn)
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = kind(fn, request_deserializer=req.FromString, response_serializer=serializer)
    return grpc.method_handlers_generic_handler(desc.full_name, handlers)


@dataclass
class RunningServer:
    """A started server: the server, its bound port, and its health servicer."""

    server: grpc.aio.Server
    port: int
    host: str
    health: health.aio.HealthServicer
    service_names: tuple[str, ...]
    # A worker of several (shared/workers.py): the port only this process listens on (port is shared).
    private_port: int = 0

    @property
    def address(self) -> str:
        """Where this process answers: its private port when it shares its public one with other workers."""
        return f"{self.host}:{self.private_port or self.port}"

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING for the server and each of its services."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            await self.health.set(name, status)


async def create_server(
    services: Iterable[Service],
    host: str = "127.0.0.1",
    port: int = 0,
    extra: Iterable[Callable[[grpc.aio.Server], None]] = (),
    options: Iterable[tuple[str, int | str]] = (),
    reuse_port: bool = False,
    private_port: int = 0,
    tls: Tls | None = None,
    client_auth: bool = True,
) -> RunningServer:
    """Start a server with the given services, grpc.health.v1 and reflection; port 0 picks a free port.
    `extra` adds servicers registered the generated way (e.g. OTLP collectors). reuse_port: one of several
    worker processes sharing `port` (SO_REUSEPORT), also listening on a private port of its own
    (`private_port`, 0: a free one). With `tls` the ports speak TLS; with its CA and client_auth (every internal
    port: all but the gateway's public one) only clients presenting a certificate that CA signed get in: the
    fleet's own services."""
    services = list(services)
    # `options` override the defaults (e.g. the gateway's smaller max_receive_message_length).
    opts = {**dict(SERVER_OPTIONS), **dict(options)}
    if reuse_port:
        opts["grpc.so_reuseport"] = 1
    server = grpc.aio.server(options=tuple(opts.items()), interceptors=(RequestDecodingGuard(),))
    server.add_generic_rpc_handlers(tuple(_handlers(s) for s in services))
    for add in extra:
        add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = tuple(s.full_name for s in services)
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    credentials = tls.server_credentials(client_auth) if tls is not None and tls.cert else None

    def bind(p: int) -> int:
        if credentials is None:
            return server.add_insecure_port(f"{host}:{p}")
        return server.add_secure_port(f"{host}:{p}", credentials)

    bound = bind(port)
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    private = bind(private_port) if reuse_port else 0
    if reuse_port and private == 0:
        raise OSError(f"could not bind {host}:{private_port}")
    await server.start()
    running = RunningServer(server, bound, host, health_servicer, names, private)
    await running.set_serving(True)
    return running


def write_ready_file(path: str, **info) -> None:
    """Atomically write {info..., pid} as JSON, so a launcher polling for it never reads half a file."""
    if not path:
        return
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({**info, "pid": os.getpid()}, f)
    os.replace(tmp, path)


# Set by launchers (shared/cluster.py): the pid whose death should stop this service too.
PARENT_PID_ENV = "FLEETSERVE_PARENT_PID"


async def wait_for_signal(
    signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT), poll_s: float = 1.0
) -> str:
    """Block until one of the signals arrives, or until the launcher named in $FLEETSERVE_PARENT_PID is gone
    (so a fleet never outlives a launcher killed with SIGKILL); returns the signal's name or "parent_exited"."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[str] = loop.create_future()
    for sig in signals:
        loop.add_signal_handler(sig, lambda s=sig: got.done() or got.set_result(s.name))
    parent = int(os.environ.get(PARENT_PID_ENV, "0") or 0)
    try:
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(got), poll_s if parent else None)
            except TimeoutError:
                # Launched children live in sessions of their own, so they are re-parented, not killed,
                # when the launcher dies; noticing that is up to them.
                if os.getppid() != parent:
                    return "parent_exited"
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


# Once none of a draining server's requests is in our code, what the server still holds this long after is a call
# gRPC accepted and never handed to us: cancelled then (drain_and_stop), not at the end of the grace period.
LEFTOVER_S = 0.5


async def drain_and_stop(
    running: RunningServer,
    grace_s: float,
    before_stop: Callable[[], Awaitable[None]] | None = None,
    after_stop: Callable[[], Awaitable[None]] | None = None,
    goaway_first: bool = False,
    idle: Callable[[], bool] | None = None,
) -> None:
    """Graceful shutdown: NOT_SERVING, `before_stop` (e.g. deregister), refuse new RPCs, let in-flight
    streams finish within grace_s (then cancel them), `after_stop` (e.g. shut the engine down). goaway_first:
    stop the gRPC server at once, before `before_stop`, for a worker whose siblings serve its shared port.
    idle(), when given, says that none of the service's requests is in its code (Drain.busy == 0): once it
    holds after `before_stop`, calls the server still has LEFTOVER_S later are cancelled at once."""
    log.info("server.draining", grace_period_s=grace_s, goaway_first=goaway_first)
    await running.set_serving(False)
    if not goaway_first:
        if before_stop is not None:
            await before_stop()
        stopping = asyncio.create_task(running.server.stop(grace_s), name="server.stop")
        try:
            await _cancel_leftovers(running, stopping, idle)
        finally:
            await stopping
    else:
        # grpc's stop closes our listeners and sends every client GOAWAY now, while in-flight calls run on: a
        # client opens its next stream on a new connection, which the kernel gives a sibling. Stopping only
        # after the drain kept clients' connections pinned here, each new stream on them refused. Streams that
        # crossed the GOAWAY are refused by HTTP/2 (clients retry those transparently); calls gRPC had queued
        # but not handed to our code yet it ends CANCELLED without details (the gateway retries those).
        stopping = asyncio.create_task(running.server.stop(grace_s), name="server.stop")
        try:
            if before_stop is not None:
                await before_stop()
            await _cancel_leftovers(running, stopping, idle)
        finally:
            await stopping
    if after_stop is not None:
        await after_stop()
    log.info("server.stopped")


async def _cancel_leftovers(
    running: RunningServer, stopping: asyncio.Task, idle: Callable[[], bool] | None
) -> None:
    """While the server stops (`stopping`): once idle() holds, give it LEFTOVER_S to finish by itself (statuses
    going out, a short unary call), then cancel what it still holds. A call that crossed the GOAWAY can stay
    queued in gRPC, never handed to our code nor refused, until the grace period's end (a router worker held one
    for 4.2 s, and the gateway's own drain cut its stream first); cancelled, it ends UNAVAILABLE without details
    ("Cancelling all calls"), which the gateway (router_unreachable) and fleetserve.client retry elsewhere."""
    if idle is None:
        return
    while not stopping.done():
        if idle():
            await asyncio.wait({stopping}, timeout=LEFTOVER_S)
            if stopping.done() or not idle():
                continue
            log.warning("server.cancelling_leftover_calls", leftover_s=LEFTOVER_S)
            await running.server.stop(None)  # cancels every call it still has, now
            return
        await asyncio.wait({stopping}, timeout=0.05)


async def cancel_and_wait(tasks: Iterable[asyncio.Task]) -> None:
    """Cancel background tasks and wait until each has finished (so nothing runs after a service stops)."""
    tasks = list(tasks)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# The collector's thresholds while serving (FLEETSERVE_GC_THRESHOLD="gen0,gen1,gen2" overrides): a relayed
# message allocates a few tracked objects (futures, coroutine frames) that die within the message, so Python's
# default of a young-generation pass every 700 allocations mostly walks and promotes live in-flight objects.
GC_THRESHOLD = (50_000, 20, 100)


def gc_threshold() -> tuple[int, ...]:
    """The thresholds freeze_heap sets: GC_THRESHOLD, or FLEETSERVE_GC_THRESHOLD's."""
    raw = os.environ.get("FLEETSERVE_GC_THRESHOLD", "")
    return tuple(int(x) for x in raw.split(",")) if raw else GC_THRESHOLD


# Under GC_THRESHOLD a busy service's collector rarely runs: the young generation's count is allocations minus
# deallocations, so objects freed by reference counting never bring a pass closer; passes of the middle generation
# come minutes apart and a full collection after 100 of them, never in some processes (a 200k soak's engine-1 went
# its last ~60k streams without one: +12 % RSS, its gc-tracked objects at 5-10x their floor). Meanwhile reference
# cycles (a cancelled stream's exception, traceback and frames) wait in whichever generation holds them, with
# their memory. So the loop runs a full collection itself every GC_FULL_EVERY_S seconds
# (FLEETSERVE_GC_FULL_EVERY_S overrides; 0: never): a walk of the objects not frozen at start-up (per-request
# objects and bounded caches: its time is logged as process.gc_full), once a period, never per request.
GC_FULL_EVERY_S = 30.0


def gc_full_every_s() -> float:
    """The period of settle_heap's full collections: GC_FULL_EVERY_S, or FLEETSERVE_GC_FULL_EVERY_S's (0: off)."""
    raw = os.environ.get("FLEETSERVE_GC_FULL_EVERY_S", "")
    value = float(raw) if raw else GC_FULL_EVERY_S
    if value < 0:
        raise ValueError(f"FLEETSERVE_GC_FULL_EVERY_S must be >= 0, got {raw!r}")
    return value


# A process whose full collections find little garbage (a registry, an idle service) backs off: its live heap would
# be walked for nothing. The period doubles after a collection that found fewer than GC_FULL_QUIET unreachable
# objects, up to GC_FULL_MAX_BACKOFF x the period, and comes back to it after one that found more.
GC_FULL_QUIET = 1_000
GC_FULL_MAX_BACKOFF = 16


def next_full_wait(wait_s: float, every_s: float, unreachable: int) -> float:
    """The wait before the next full collection, after one that waited wait_s and found unreachable objects."""
    if unreachable >= GC_FULL_QUIET:
        return every_s
    return min(wait_s * 2, every_s * GC_FULL_MAX_BACKOFF)


async def collect_fully_forever(every_s: float) -> None:
    """Full collections every every_s (longer while they find little: GC_FULL_QUIET), each logged as
    process.gc_full (unreachable objects found, wall and CPU milliseconds, seconds until the next one)."""
    wait_s = every_s
    while True:
        await asyncio.sleep(wait_s)
        started, cpu_started = time.perf_counter(), time.thread_time()
        unreachable = gc.collect(2)
        cpu_ms = (time.thread_time() - cpu_started) * 1000
        wall_ms = (time.perf_counter() - started) * 1000
        wait_s = next_full_wait(wait_s, every_s, unreachable)
        log.info(
            "process.gc_full",
            unreachable=unreachable,
            ms=round(wall_ms, 3),
            cpu_ms=round(cpu_ms, 3),
            next_s=wait_s,
        )


def freeze_heap() -> None:
    """After start-up: collect once, then freeze what is left (modules, settings, servicers) into the permanent
    generation, so the collector's passes during serving walk only per-request objects; then the serving
    thresholds (gc_threshold)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*gc_threshold())


@contextlib.asynccontextmanager
async def settle_heap() -> AsyncIterator[None]:
    """Serve inside this block: freeze_heap on entry, and the periodic full collections (collect_fully_forever,
    unless gc_full_every_s is 0) as a task of the running loop that the block owns: cancelled and awaited when
    the block ends, however it ends, so no caller can leave it running after its service stopped."""
    freeze_heap()
    every_s = gc_full_every_s()
    collector = (
        asyncio.get_running_loop().create_task(collect_fully_forever(every_s)) if every_s > 0 else None
    )
    try:
        yield
    finally:
        if collector is not None:
            await cancel_and_wait([collector])


def run(main: Callable[[], Awaitable[None]]) -> None:
    """Run a service's async main on uvloop (where available) and exit 0 after a clean shutdown."""
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:  # Windows: plain asyncio
        asyncio.run(main())


class App:
    """What a service's `start()` returns: its address and how to stop it gracefully."""

    address: str

    async def stop(self, grace_s: float) -> None:  # pragma: no cover - interface
        raise NotImplementedError


async def serve_main(
    service: str,
    settings,
    start: Callable[..., Awaitable[App]],
) -> None:
    """The whole life of a service process: logging, telemetry, start, ready file, wait for SIGTERM or
    SIGINT, graceful stop, flush telemetry. `start(settings, telemetry)` builds and starts the service."""
    from shared import prom
    from shared.process_stats import start_from_env
    from shared.telemetry import configure_logging, setup_telemetry
    from shared.worker_process_metrics import start_if_worker

    configure_logging(service, settings.log_level, settings.log_json)
    telemetry = setup_telemetry(
        service, settings.otlp_endpoint, settings.metrics_export_interval_s, Tls.from_settings(settings)
    )
    stats = start_from_env()  # soak runs: RSS, fds, threads, tasks in the log
    worker_stats = start_if_worker()  # --workers N: CPU and memory on the service's /metrics
    app = await start(settings, telemetry)
    # The app's own instruments (`metrics_registry`) are served beside the process-wide default registry.
    metrics = prom.start_metrics_server(
        settings.host,
        settings.metrics_port,
        [getattr(app, "metrics_registry", None)],
        prom.multiprocess_dir(),
    )
    metrics_address = metrics.address if metrics is not None else ""
    async with settle_heap():
        # ready_info: extra addresses a launcher needs (the gateway's HTTP port).
        write_ready_file(
            settings.ready_file,
            address=app.address,
            service=service,
            metrics_address=metrics_address,
            **getattr(app, "ready_info", {}),
        )
        log.info(f"{service}.started", address=app.address, metrics_address=metrics_address or None)
        reason = await wait_for_signal()
        log.info(f"{service}.stopping", reason=reason)
        await app.stop(settings.grace_period_s)
        if metrics is not None:
            # After the drain, so that a scrape during it still sees the last requests counted.
            metrics.stop()
    if background := [t for t in (stats, worker_stats) if t is not None]:
        await cancel_and_wait(background)
    telemetry.shutdown()
    log.info(f"{service}.exited")

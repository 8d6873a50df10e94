"""`--workers N` for the gateway and the router: one small supervisor process and N worker processes of the same
service. The workers share the service's public ports with SO_REUSEPORT (gRPC, and the gateway's HTTP), so the
kernel spreads incoming connections over them, and each also listens on a private port of its own: the hop in
front can then open one connection per worker and balance its calls exactly (the ready file lists them as
`worker_addresses`). A worker that dies is restarted; SIGTERM drains every worker. The sim engine runs as one
such worker when it is recycled (--max-requests-per-worker): the same port and replica id in a fresh process."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from multiprocessing import connection
from pathlib import Path

import structlog

from shared import prom
from shared.channels import CHANNEL_OPTIONS
from shared.server import PARENT_PID_ENV, write_ready_file

log = structlog.get_logger("fleetserve.workers")

WORKER_START_TIMEOUT_S = 120.0
# A worker that keeps dying is restarted at most this often.
RESTART_DELAY_S = 1.0
# After a recycled worker's replacement is ready, the next recycle waits this long: the hop in front dials each
# worker's private port, failed to reach it while it was away, and retries the connection only after its
# reconnect backoff (at most this, shared/channels.py); two recycles back to back left it no worker it could reach.
RECYCLE_SPACING_S = dict(CHANNEL_OPTIONS)["grpc.max_reconnect_backoff_ms"] / 1000


def share(total: int, index: int, count: int) -> int:
    """Worker `index`'s share of an integer limit split exactly over `count` workers (the shares add up to it)."""
    return total // count + (1 if index < total % count else 0)


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, not listening, SO_REUSEPORT socket on host:port (0: a free port): it keeps the port ours while
    the workers bind it too, and takes no connections itself (only listening sockets join the group)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host.strip("[]"), port))
    return sock


def _worker_main(service: str, settings_cls: type, settings: dict) -> None:
    """A worker process: the service's ordinary life (shared.server.serve_main) with its worker settings."""
    import importlib

    from shared.server import run, serve_main

    start = importlib.import_module(f"services.{service}.app").start
    config = settings_cls.model_validate(settings)
    run(lambda: serve_main(service, config, start))


class Stop(Exception):
    """SIGTERM or SIGINT reached a supervisor process."""


def raise_stop_on_signals() -> None:
    """In a (synchronous) supervisor: the first SIGTERM or SIGINT raises Stop in the main thread, wherever it
    waits; later ones are ignored while it stops what it started."""

    def on_signal(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def supervise(
    service: str,
    settings,
    *,
    extra_ports: dict[str, int] | None = None,
    prepare: Callable[[object], dict] | None = None,
    worker_metrics: bool = False,
) -> int:
    """Run `settings.workers` workers of `service` until SIGTERM; the exit code. `extra_ports` names further
    ports the workers share (field name -> port, e.g. the gateway's http_port); `prepare(settings)` runs once
    here before any worker starts and returns field overrides for the workers (the gateway bootstraps its
    tenants database once, so that workers do not race to). With `worker_metrics` each worker serves its own
    /metrics on the service's metrics port (the engine: one worker, whose series its app computes) and this
    process serves none."""
    from shared.telemetry import configure_logging

    configure_logging(service, settings.log_level, settings.log_json)
    count = settings.workers
    parent = int(os.environ.get(PARENT_PID_ENV, "0") or 0)
    raise_stop_on_signals()
    held = {"port": reserve_port(settings.host, settings.port)}
    for name, port in (extra_ports or {}).items():
        held[name] = reserve_port(settings.host, port)
    ports = {name: s.getsockname()[1] for name, s in held.items()}
    overrides = prepare(settings) if prepare is not None else {}
    run_dir = Path(settings.ready_file).parent if settings.ready_file else Path(tempfile.gettempdir())
    # One Prometheus /metrics for the service, served here from every worker's files (prometheus-client's
    # multiprocess mode; the workers inherit the directory and serve none themselves).
    prom_dir = metrics = None
    if not worker_metrics:
        prom_dir = prom.prepare_multiprocess(run_dir / f"{service}-{os.getpid()}-prometheus")
        metrics = prom.start_metrics_server(settings.host, settings.metrics_port, [], prom_dir)
    metrics_port = settings.metrics_port
    os.environ[PARENT_PID_ENV] = str(os.getpid())  # workers stop by themselves if this process dies
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, multiprocessing.process.BaseProcess] = {}
    code = 0

    private: dict[int, int] = {}
    # Exists once the whole service stops: a draining worker then keeps the port open (siblings_serve).
    stopping = run_dir / f"{service}-{os.getpid()}-stopping"
    stopping.unlink(missing_ok=True)

    def spawn(i: int) -> tuple[multiprocessing.process.BaseProcess, Path]:
        ready = run_dir / f"{service}-{os.getpid()}-worker-{i}.json"
        ready.unlink(missing_ok=True)
        worker = settings.model_dump() | overrides | ports
        # A restarted worker takes its predecessor's private port: the hop in front keeps its connection.
        worker |= {"workers": 1, "worker_index": i, "worker_count": count, "ready_file": str(ready)}
        worker["metrics_port"] = metrics_port if worker_metrics else -1
        worker["worker_port"] = private.get(i, 0)
        recycle = recycle_file(run_dir, service, i)
        recycle.unlink(missing_ok=True)  # a new worker starts its count afresh
        worker["recycle_file"] = str(recycle) if settings.max_requests_per_worker else ""
        worker["stop_file"] = str(stopping)
        p = ctx.Process(
            target=_worker_main, args=(service, type(settings), worker), name=f"{service}-worker-{i}"
        )
        p.start()
        return p, ready

    try:
        readies = {}
        for i in range(count):
            procs[i], readies[i] = spawn(i)
        infos = [_await_ready(procs[i], readies[i]) for i in range(count)]
        for i, info in enumerate(infos):
            private[i] = int(info["address"].rpartition(":")[2])
        metrics_address = metrics.address if metrics is not None else ""
        if worker_metrics and infos[0].get("metrics_address"):
            metrics_address = infos[0]["metrics_address"]
            metrics_port = int(metrics_address.rpartition(":")[2])  # a replacement serves on the same port
        for s in held.values():
            s.close()  # every worker listens now: the port stays in use
        held = {}
        shared = {name: f"{_host(settings.host)}:{p}" for name, p in ports.items()}
        extra = {f"{name[:-5]}_address": a for name, a in shared.items() if name.endswith("_port")}
        # gateway --embedded-router: each worker's router port (the autoscaler polls every one).
        routers = [info["router_address"] for info in infos if info.get("router_address")]
        embedded = {"router_addresses": routers} if routers else {}
        write_ready_file(
            settings.ready_file,
            address=shared["port"],
            service=service,
            workers=count,
            worker_addresses=[info["address"] for info in infos],
            worker_pids=[p.pid for p in procs.values()],
            **embedded,
            metrics_address=metrics_address,
            **extra,
        )
        log.info(f"{service}.workers_started", address=shared["port"], workers=count, **extra)
        code = _watch(procs, spawn, parent, service, lambda i: recycle_file(run_dir, service, i))
    except Stop as stop:
        log.info(f"{service}.stopping", reason=str(stop))
    except Exception:
        log.exception(f"{service}.workers_failed")
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for s in held.values():
            s.close()
        stopping.touch()
        _stop(list(procs.values()), settings.grace_period_s)
        stopping.unlink(missing_ok=True)
        if metrics is not None:
            metrics.stop()
        if prom_dir is not None:
            shutil.rmtree(prom_dir, ignore_errors=True)
        log.info(f"{service}.exited", code=code)
    return code


def siblings_serve(settings) -> bool:
    """Whether this process, draining now, is a worker whose siblings go on serving the ports they share (it is
    recycled or stopped alone, not with the whole service): it may then hand its clients over to them (GOAWAY,
    Connection: close) instead of answering them UNAVAILABLE while it drains."""
    stop_file = getattr(settings, "stop_file", "")
    return getattr(settings, "worker_count", 1) > 1 and bool(stop_file) and not Path(stop_file).exists()


def recycle_file(run_dir: Path, service: str, index: int) -> Path:
    """The file worker `index` touches when it is due for recycling (shared/recycle.py)."""
    return run_dir / f"{service}-{os.getpid()}-worker-{index}.recycle"


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _await_ready(proc, ready: Path) -> dict:
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready.exists():
            info = json.loads(ready.read_text())
            ready.unlink(missing_ok=True)
            return info
        if not proc.is_alive():
            raise RuntimeError(f"{proc.name} exited with {proc.exitcode} before it was ready")
        proc.join(0.05)
    raise TimeoutError(f"{proc.name} not ready within {WORKER_START_TIMEOUT_S} s")


def _watch(procs: dict, spawn, parent: int, service: str, due: Callable[[int], Path]) -> int:
    """Restart a worker that exits (at most once per RESTART_DELAY_S each when it failed; at once when it was
    recycled: exit 0) until a signal or the launcher's exit. Workers due for recycling (their file exists) are
    sent SIGTERM one at a time, so that the others serve meanwhile."""
    recycling: int | None = None
    next_recycle = 0.0  # monotonic: none before (RECYCLE_SPACING_S after the last replacement was ready)
    while True:
        sentinels = {p.sentinel: i for i, p in procs.items()}
        for ready in connection.wait(list(sentinels), timeout=1.0):
            i = sentinels[ready]
            procs[i].join(5.0)
            code = procs[i].exitcode
            prom.worker_exited(procs[i].pid)
            if code == 0:
                # Drained and exited: recycled (--max-requests-per-worker, shared/recycle.py).
                log.info(f"{service}.worker_recycled", worker=i, pid=procs[i].pid)
            else:
                log.error(f"{service}.worker_exited", worker=i, exitcode=code, will="restart")
                time.sleep(RESTART_DELAY_S)
            if recycling == i:
                recycling = None
            procs[i], ready_file = spawn(i)
            _await_ready(procs[i], ready_file)
            next_recycle = time.monotonic() + RECYCLE_SPACING_S
        if recycling is None and time.monotonic() >= next_recycle:
            i = next((i for i in procs if due(i).exists()), None)
            if i is not None and procs[i].is_alive():
                recycling = i
                log.info(f"{service}.worker_recycling", worker=i, pid=procs[i].pid)
                procs[i].terminate()  # SIGTERM: the worker drains, exits 0, and is replaced above
        if parent and os.getppid() != parent:
            log.info(f"{service}.stopping", reason="parent_exited")
            return 0


def _stop(procs: list, grace_s: float) -> None:
    """SIGTERM every worker (each drains within its grace period), kill what outlives it."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace_s + 5.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            log.warning("workers.killed", worker=p.name)
            p.kill()
            p.join(5.0)

"""One vLLM replica served by several front-end processes that share one engine core, as
`vllm serve --api-server-count N` does: a supervisor starts the engine core (vLLM's launch_core_engines) and N
front ends, each an AsyncLLM client with its own index serving EngineService on its own port. The replica stays
ONE replica in the fleet: the primary front end (index 0) registers it with every front end as an endpoint,
reads the engine core's KV events, and reports the load of all front ends (a shared table, load_board.py). The
supervisor serves the replica's one /metrics: every front end's series merged (prometheus-client's
multiprocess mode, as vllm serve does for its API servers) and the load gauges from the shared table."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing import connection
from pathlib import Path
from typing import Any

import structlog

from services.engine.engine_metrics import ReplicaCollector
from services.engine.load_board import LoadBoard
from shared import prom
from shared.server import PARENT_PID_ENV, write_ready_file
from shared.workers import Stop, raise_stop_on_signals

log = structlog.get_logger(__name__)

MAX_AUTO_FRONTENDS = 8
# Cores a front end is given when the count is chosen automatically: besides the front ends, each GPU's engine
# core and GPU worker keep a core busy, and the gateway and router of the fleet want cores of their own.
CORES_PER_FRONTEND = 4
# From the engine core being up to every front end serving (their AsyncLLM clients connect to it).
FRONTEND_START_TIMEOUT_S = 300.0


def auto_frontends(cores: int | None = None) -> int:
    """Front ends for one GPU on this host: a quarter of the cores this process may use, 1 to 8 (one on the
    2-core CI box, four on a 16-core GPU machine)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_AUTO_FRONTENDS, cores // CORES_PER_FRONTEND))


@dataclass(frozen=True)
class Frontend:
    """What one front-end process of a replica needs: its index among `count`, vLLM's client config (its end of
    the engine core's sockets), the engine core's KV-event endpoint, the shared load table, and `exchange`,
    which reports this front end's address and returns every front end's (index order) once all are bound."""

    index: int
    count: int
    client: dict
    kv_endpoint: str
    board_path: str
    exchange: Callable[[str], Awaitable[list[str]]]

    def backend_options(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "kv_endpoint": self.kv_endpoint,
            "kv_events": self.index == 0 and bool(self.kv_endpoint),
            "board": LoadBoard(self.board_path, self.count),
            "board_row": self.index,
        }


# -- a front-end process ------------------------------------------------------------------------------------


def frontend_process(
    settings: dict, index: int, count: int, client: dict, kv_endpoint: str, board_path: str, conn
) -> None:
    """Entry point of a front-end process (spawned): serve until SIGTERM, as a plain engine worker does."""
    from services.engine.config import EngineSettings
    from shared.server import run

    config = EngineSettings.model_validate(settings)

    async def exchange(address: str) -> list[str]:
        conn.send(address)
        # The supervisor answers once every front end is bound; reading blocks, so not on the loop.
        return await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    frontend = Frontend(index, count, client, kv_endpoint, board_path, exchange)
    run(lambda: _serve_frontend(config, frontend))


async def _serve_frontend(settings, frontend: Frontend) -> None:
    from services.engine.app import start
    from shared.server import settle_heap, wait_for_signal
    from shared.telemetry import configure_logging, setup_telemetry

    configure_logging("engine", settings.log_level, settings.log_json)
    structlog.contextvars.bind_contextvars(frontend=frontend.index)
    telemetry = setup_telemetry("engine", settings.otlp_endpoint, settings.metrics_export_interval_s)
    app = await start(settings, telemetry, frontend)
    async with settle_heap():
        # The supervisor saw the engine-core process exit (this process cannot: vLLM watches only engine cores it
        # started itself): streams fail, health turns NOT_SERVING, the primary leaves the registry.
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGUSR1, lambda: app.backend.mark_dead("the engine-core process exited")
        )
        log.info("engine.started", address=app.address, frontend=frontend.index)
        reason = await wait_for_signal()
        log.info("engine.stopping", reason=reason, frontend=frontend.index)
        await app.stop(settings.grace_period_s)
        app.backend.board.close()
    telemetry.shutdown()
    log.info("engine.exited", frontend=frontend.index)


# -- the supervisor -----------------------------------------------------------------------------------------


def supervise(settings, count: int) -> int:
    """The supervisor process of a replica with `count` front ends: start the engine core and the front ends,
    write the ready file (address: the primary's; frontends: all), pass on the engine core's death, and on
    SIGTERM stop the front ends (primary first, so the registry drains the replica before the others stop)
    and then the engine core. Returns the exit code."""
    from services.engine.vllm_backend import engine_argv, load_vllm_api
    from shared.telemetry import configure_logging

    configure_logging("engine", settings.log_level, settings.log_json)
    parent = int(os.environ.get(PARENT_PID_ENV, "0") or 0)
    raise_stop_on_signals()
    api = load_vllm_api()
    if api.launch_core is None:
        raise SystemExit("this vLLM cannot run several front ends on one engine core")
    argv = engine_argv(
        settings.vllm_args,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
    )
    kv_path = tempfile.mktemp(prefix=f"fleetserve-kv-{settings.replica_id}-", suffix=".sock")  # noqa: S306 - an ipc path the engine core binds
    # No endpoint: the engine core publishes no KV events (the default; on with --vllm-kv-events).
    kv_endpoint = f"ipc://{kv_path}" if settings.vllm_kv_events else ""
    board = LoadBoard(None, count)
    run_dir = Path(settings.ready_file).parent if settings.ready_file else Path(tempfile.gettempdir())
    # Before any front end (or the engine core) starts: they inherit the directory and write their series there.
    prom_dir = prom.prepare_multiprocess(run_dir / f"engine-{os.getpid()}-prometheus")
    metrics = None
    ctx = multiprocessing.get_context("spawn")
    # Front ends stop by themselves if this process dies (shared.server.wait_for_signal watches it).
    os.environ[PARENT_PID_ENV] = str(os.getpid())
    procs: list[multiprocessing.process.BaseProcess] = []
    conns: list[connection.Connection] = []
    manager = None
    code = 0
    started = time.monotonic()
    try:
        with api.launch_core(argv, kv_endpoint, count) as (clients, manager):
            for i, client in enumerate(clients):
                mine, theirs = ctx.Pipe()
                p = ctx.Process(
                    target=frontend_process,
                    args=(settings.model_dump(), i, count, client, kv_endpoint, board.path, theirs),
                    name=f"EngineFrontend_{i}",
                )
                p.start()
                theirs.close()
                procs.append(p)
                conns.append(mine)
        engine_start_s = time.monotonic() - started  # launch_core returns once the engine core is up
        addresses = _gather(conns, procs, FRONTEND_START_TIMEOUT_S)
        for c in conns:
            c.send(addresses)
        # Only the merged series and the board's: this process's own default registry is not the replica's.
        metrics = prom.start_metrics_server(
            settings.host,
            settings.metrics_port,
            [ReplicaCollector(prom_dir, board, settings.model)],
            include_default=False,
        )
        write_ready_file(
            settings.ready_file,
            address=addresses[0],
            service="engine",
            metrics_address=metrics.address if metrics is not None else "",
            frontends=addresses,
            frontend_pids=[p.pid for p in procs],
            engine_start_s=round(engine_start_s, 3),
        )
        log.info(
            "engine.frontends_started",
            replica_id=settings.replica_id,
            frontends=addresses,
            engine_start_s=round(engine_start_s, 3),
            ready_s=round(time.monotonic() - started, 3),
        )
        code = _watch(procs, manager, parent)
    except Stop as stop:
        log.info("engine.stopping", reason=str(stop))
    except Exception:
        log.exception("engine.frontends_failed")
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _stop_frontends(procs, settings.grace_period_s)
        if manager is not None:
            manager.shutdown()
        if metrics is not None:
            metrics.stop()  # after the front ends drained: a scrape meanwhile still counts their last requests
        shutil.rmtree(prom_dir, ignore_errors=True)
        board.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(kv_path)
        log.info("engine.exited", code=code)
    return code


def _gather(conns, procs, timeout_s: float) -> list[str]:
    """Each front end's advertised address, in index order (they bind once their AsyncLLM client is up)."""
    addresses: list[str | None] = [None] * len(conns)
    pending = {c: i for i, c in enumerate(conns)}
    sentinels = {p.sentinel: p for p in procs}
    deadline = time.monotonic() + timeout_s
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"front ends {sorted(pending.values())} did not start within {timeout_s} s")
        for ready in connection.wait([*pending, *sentinels], timeout=left):
            if ready in pending:
                addresses[pending.pop(ready)] = ready.recv()
            elif ready in sentinels:
                p = sentinels[ready]
                raise RuntimeError(f"front end {p.name} exited with {p.exitcode} while starting")
    return [a for a in addresses if a is not None]


def _watch(procs, manager, parent: int) -> int:
    """Until a signal: a front end that exits ends the replica (exit 1: an orchestrator restarts it whole); an
    engine core that exits turns every front end NOT_SERVING (SIGUSR1), and the replica stays up, as a
    single-process worker does, for an orchestrator to restart."""
    front = {p.sentinel: p for p in procs}
    cores = set(manager.sentinels()) if manager is not None else set()
    while True:
        for ready in connection.wait([*front, *cores], timeout=1.0):
            if ready in front:
                p = front[ready]
                log.error("engine.frontend_exited", frontend=p.name, exitcode=p.exitcode)
                return 1
            cores.discard(ready)
            log.error("engine.core_exited", will="front ends NOT_SERVING, deregister")
            for p in procs:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGUSR1)
        if parent and os.getppid() != parent:
            log.info("engine.stopping", reason="parent_exited")
            return 0


def _stop_frontends(procs, grace_s: float) -> None:
    """SIGTERM the primary first (it drains the replica in the registry), then the rest; kill what outlives its
    grace period."""
    alive = [p for p in procs if p.is_alive()]
    for i, p in enumerate(alive):
        p.terminate()
        if i == 0 and len(alive) > 1:
            p.join(min(0.5, grace_s))  # routers hear DRAINING before the other front ends stop accepting
    deadline = time.monotonic() + grace_s + 10.0
    for p in alive:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            log.warning("engine.frontend_killed", frontend=p.name)
            p.kill()
            p.join(5.0)

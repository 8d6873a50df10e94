"""A fresh local fleet for one bench run (--spawn): shared.cluster.Cluster on a plain asyncio loop in its own thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import structlog

from shared.cluster import Cluster, ClusterConfig


@contextlib.contextmanager
def structlog_to_stderr(level: int = logging.WARNING) -> Iterator[None]:
    """While the block runs, structlog (which the launcher and the services log with) writes `level` and worse to
    stderr, where structlog's default would print everything to stdout, which is the bench's JSON. A process that
    configured structlog itself keeps its configuration; otherwise the defaults are back afterwards (no lasting
    change in a process that embeds the bench, such as a test run)."""
    if structlog.is_configured():
        yield
        return
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    try:
        yield
    finally:
        structlog.reset_defaults()


class SpawnedFleet:
    """`async with SpawnedFleet(engines, speed_factor) as state:` starts the fleet in a temp dir, yields its state
    (as `fleetserve up` writes it), and stops it on exit, also when the run is cancelled.

    Why a thread: the bench runs on uvloop, which starts child processes with a plain fork(); a child forked while
    gRPC's threads are busy (health probes of the services already started) can crash before it execs, in gRPC's
    fork handlers. The standard loop's subprocess path does not, so the launcher gets a loop of that kind."""

    def __init__(self, engines: int = 1, speed_factor: float = 1.0, **config) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="fleetserve-bench-")
        self.data_dir = Path(self._tmp.name)
        self.engines, self.speed_factor = engines, speed_factor
        self.cluster = Cluster(
            ClusterConfig(data_dir=self.data_dir, engines=engines, speed_factor=speed_factor, **config)
        )
        self.exit_codes: dict[str, int | None] = {}
        self._runner = asyncio.Runner(loop_factory=asyncio.SelectorEventLoop)
        self._loop = self._runner.get_loop()  # created here so a stop request can be queued before it runs
        self._stop = asyncio.Event()  # binds to the fleet loop on first wait
        self._thread = threading.Thread(target=self._main, name="bench-fleet", daemon=True)
        # Futures of the caller's loop, resolved from the fleet thread through call_soon_threadsafe.
        self._caller: asyncio.AbstractEventLoop | None = None
        self._started: asyncio.Future[dict] | None = None
        self._finished: asyncio.Future[dict] | None = None

    def _deliver(self, fut: asyncio.Future, result=None, exc: BaseException | None = None) -> None:
        def resolve() -> None:
            if fut.done():  # the caller gave up waiting (cancelled)
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        self._caller.call_soon_threadsafe(resolve)

    def _main(self) -> None:
        try:
            with self._runner:
                codes = self._runner.run(self._life())
        except BaseException as e:  # handed to the awaiting side, which re-raises it
            self._deliver(self._started, exc=e)
            self._deliver(self._finished, exc=e)
        else:
            self._deliver(self._finished, codes)

    async def _life(self) -> dict:
        start = asyncio.create_task(self.cluster.start())
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            start.cancel()  # Cluster.start stops whatever it had started before it re-raises
        try:
            await start
        except BaseException as e:
            stop.cancel()
            cancelled = isinstance(e, asyncio.CancelledError)
            self._deliver(self._started, exc=RuntimeError("fleet start cancelled") if cancelled else e)
            return {}
        self._deliver(self._started, self.cluster.state())
        await stop
        return await self.cluster.stop()

    async def _shutdown(self) -> dict:
        self._loop.call_soon_threadsafe(self._stop.set)
        try:
            return await self._finished
        finally:
            self._thread.join(timeout=5)
            self._tmp.cleanup()

    async def __aenter__(self) -> dict:
        print(
            f"bench: starting a fleet of {self.engines} sim engine(s) (speed factor {self.speed_factor:g}) "
            f"in {self.data_dir} ...",
            file=sys.stderr,
            flush=True,
        )
        self._caller = asyncio.get_running_loop()
        self._started, self._finished = self._caller.create_future(), self._caller.create_future()
        self._thread.start()
        try:
            return await self._started
        except BaseException:
            await asyncio.shield(self._shutdown())
            raise

    async def __aexit__(self, *exc) -> None:
        print("bench: stopping the fleet ...", file=sys.stderr, flush=True)
        self.exit_codes = await asyncio.shield(self._shutdown()) or {}
        bad = {n: c for n, c in self.exit_codes.items() if c not in (0, None)}
        if bad:
            print(f"bench: non-zero exits while stopping the fleet: {bad}", file=sys.stderr, flush=True)

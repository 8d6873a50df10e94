"""A fresh local fleet for one bench run (--spawn), started and stopped with shared.cluster.Cluster."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import tempfile
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
    (as `fleetserve up` writes it), and stops it on exit, also when the run is cancelled."""

    def __init__(self, engines: int = 1, speed_factor: float = 1.0, **config) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="fleetserve-bench-")
        self.data_dir = Path(self._tmp.name)
        self.engines, self.speed_factor = engines, speed_factor
        self.cluster = Cluster(
            ClusterConfig(data_dir=self.data_dir, engines=engines, speed_factor=speed_factor, **config)
        )
        self.exit_codes: dict[str, int | None] = {}

    async def __aenter__(self) -> dict:
        print(
            f"bench: starting a fleet of {self.engines} sim engine(s) (speed factor {self.speed_factor:g}) "
            f"in {self.data_dir} ...",
            file=sys.stderr,
            flush=True,
        )
        try:
            await self.cluster.start()  # stops whatever it started if it fails or is cancelled
        except BaseException:
            self._tmp.cleanup()
            raise
        return self.cluster.state()

    async def __aexit__(self, *exc) -> None:
        print("bench: stopping the fleet ...", file=sys.stderr, flush=True)
        try:
            # Shielded: a Ctrl-C that cancelled the run must not also cut the fleet's orderly stop short.
            self.exit_codes = await asyncio.shield(self.cluster.stop())
        finally:
            self._tmp.cleanup()
        bad = {n: c for n, c in self.exit_codes.items() if c not in (0, None)}
        if bad:
            print(f"bench: non-zero exits while stopping the fleet: {bad}", file=sys.stderr, flush=True)

"""A process's vital signs for soak runs: RSS, open fds, threads and asyncio tasks, logged as `process.stats`
every FLEETSERVE_PROCESS_STATS_S seconds (unset or 0: off); with FLEETSERVE_TRACEMALLOC=N also the N allocation
sites that grew most since the first sample (what grows, when something does)."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import tracemalloc

import structlog

log = structlog.get_logger("fleetserve.process")

INTERVAL_ENV = "FLEETSERVE_PROCESS_STATS_S"
TRACEMALLOC_ENV = "FLEETSERVE_TRACEMALLOC"


def snapshot() -> dict[str, float | int]:
    """rss_mb, fds, threads and asyncio tasks of this process now (Linux /proc; fds and RSS 0 elsewhere)."""
    rss_kb = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss_kb = int(line.split()[1])
    except OSError:
        pass
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = 0
    try:
        tasks = len(asyncio.all_tasks())
    except RuntimeError:  # no running loop
        tasks = 0
    return {
        "rss_mb": round(rss_kb / 1024, 2),
        "fds": fds,
        "threads": threading.active_count(),
        "tasks": tasks,
        "gc_objects": len(gc.get_objects()),
        "gc_full": gc.get_stats()[2]["collections"],  # full collections so far (the oldest generation's)
    }


async def report_forever(interval_s: float, top: int = 0) -> None:
    """Log process.stats every interval_s (and with top > 0, the top allocation sites grown since the start)."""
    base = None
    if top:
        tracemalloc.start(1)  # one frame per allocation: cheap enough to leave on for a whole soak
        base = tracemalloc.take_snapshot()
    while True:
        await asyncio.sleep(interval_s)
        fields: dict[str, object] = dict(snapshot())
        if base is not None:
            diff = tracemalloc.take_snapshot().compare_to(base, "lineno")[:top]
            fields["grown"] = [
                {"kb": round(d.size_diff / 1024, 1), "count": d.count_diff, "at": str(d.traceback[0])}
                for d in diff
            ]
        log.info("process.stats", **fields)


def start_from_env() -> asyncio.Task | None:
    """Start report_forever when FLEETSERVE_PROCESS_STATS_S asks for it; the task, or None."""
    interval = float(os.environ.get(INTERVAL_ENV, "0") or 0)
    if interval <= 0:
        return None
    top = int(os.environ.get(TRACEMALLOC_ENV, "0") or 0)
    return asyncio.get_running_loop().create_task(report_forever(interval, top))

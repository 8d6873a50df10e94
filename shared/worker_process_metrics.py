"""CPU and memory of a service's worker processes (`--workers N`) on its one /metrics, recorded as they go."""

from __future__ import annotations

import asyncio
import os
import time

from shared import prom

# How often each worker records (Prometheus scrapes every 15-60 s; a sample costs a few microseconds).
INTERVAL_S = 2.0
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    """Resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class WorkerProcessMetrics:
    """prometheus-client's process_* collector reads /proc when scraped, which its multiprocess mode cannot
    merge over workers, so a service run with --workers N had no CPU or memory series at all. Each worker
    records its own instead: process_cpu_seconds_total and process_resident_memory_bytes keep the
    single-process names (summed over the workers, so one dashboard query fits 1 or N), and
    fleetserve:worker_cpu_busy_ratio{pid} says how near a core each worker is (a tier to widen)."""

    def __init__(self) -> None:
        # A registry of their own: the default one has prometheus-client's process collector under these names
        # (what a one-process service serves). Multiprocess values go to the shared files whatever the registry.
        registry = prom.new_registry()
        self.cpu = prom.counter(
            "process_cpu_seconds", "User and system CPU of the service's workers, summed", registry=registry
        )
        self.rss = prom.gauge(
            "process_resident_memory_bytes",
            "Resident memory of the service's live workers, summed",
            registry=registry,
        )
        self.busy = prom.gauge(
            "fleetserve:worker_cpu_busy_ratio",
            "Share of one core a worker process used over the last few seconds (1 = a core busy all the time)",
            registry=registry,
            multiprocess_mode="liveall",
        )
        self._cpu_s = 0.0  # the first sample counts the CPU of the process's start-up too
        self._at: float | None = None

    def record(self) -> None:
        """One sample: CPU since the last (every thread of the process), memory now, the busy share between."""
        cpu_s, now = time.process_time(), time.monotonic()
        spent = cpu_s - self._cpu_s
        self.cpu.inc(spent)
        self.rss.set(_rss_bytes())
        if self._at is not None and now > self._at:
            self.busy.set(round(spent / (now - self._at), 4))
        self._cpu_s, self._at = cpu_s, now


async def record_forever(metrics: WorkerProcessMetrics, interval_s: float = INTERVAL_S) -> None:
    while True:
        metrics.record()
        await asyncio.sleep(interval_s)


def start_if_worker() -> asyncio.Task | None:
    """Record this process's CPU and memory when it is one of several workers of a service; the task, or None."""
    if not prom.multiprocess_dir():
        return None
    return asyncio.get_running_loop().create_task(record_forever(WorkerProcessMetrics()))

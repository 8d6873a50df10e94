"""CPU and memory of a service's worker processes (`--workers N`) on its one /metrics, recorded as they go."""

from __future__ import annotations

import asyncio
import time

import prometheus_client as pc

from shared import prom

# How often each worker records (Prometheus scrapes every 15-60 s; a sample costs ~160 us, measured).
INTERVAL_S = 2.0
_CPU, _RSS = "process_cpu_seconds_total", "process_resident_memory_bytes"


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
        # prometheus-client's own reading of /proc (Linux; nothing elsewhere), on no registry: read here, as
        # it would be when scraped.
        self._process = pc.ProcessCollector(registry=None)
        self._cpu_s = 0.0  # the first sample counts the CPU of the process's start-up too
        self._at: float | None = None

    def record(self) -> None:
        """One sample: CPU since the last (every thread of the process), memory now, the busy share between."""
        now = time.monotonic()
        values = {x.name: x.value for family in self._process.collect() for x in family.samples}
        if _CPU not in values:
            return
        cpu_s = values[_CPU]
        spent = cpu_s - self._cpu_s
        self.cpu.inc(spent)
        self.rss.set(values.get(_RSS, 0.0))
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

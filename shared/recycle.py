"""--max-requests-per-worker: a worker process of a `--workers N` service restarts itself after serving that many
requests (plus up to --max-requests-jitter more, so that workers do not restart together), as gunicorn's
max_requests does. It bounds what one process can accumulate that no code of ours can free: grpc.aio leaks a few
hundred bytes natively on some cancelled streams (its own send batch in flight when a server call is cancelled,
grpc/grpc#43360; loadtest/cancel_leak.py).

A worker at its limit only says so (it touches its recycle file) and goes on serving; the supervisor
(shared/workers.py) recycles one worker at a time, so the others always serve: it sends that worker SIGTERM,
the worker drains as on any SIGTERM (new requests answered UNAVAILABLE SHUTTING_DOWN + RetryInfo, which the
gateway retries on another router worker; streams finish within the grace period) and exits 0, and its
replacement starts at once on the same ports."""

from __future__ import annotations

import random
from pathlib import Path

import structlog

log = structlog.get_logger("fleetserve.workers")


class Recycler:
    """Counts a worker's requests; at its limit, asks the supervisor (once) to recycle this worker."""

    __slots__ = ("limit", "served", "triggered", "path")

    def __init__(
        self, path: str, max_requests: int, jitter: int = 0, rng: random.Random | None = None
    ) -> None:
        self.path = path
        self.limit = max_requests + (rng or random.Random()).randint(0, max(0, jitter))
        self.served = 0
        self.triggered = False

    def served_one(self) -> None:
        self.served += 1
        if self.served >= self.limit and not self.triggered:
            self.triggered = True
            log.info("worker.recycle_due", served=self.served, limit=self.limit)
            Path(self.path).touch()


def recycler(settings) -> Recycler | None:
    """The worker's Recycler, or None (not a supervised worker, or no limit set)."""
    limit = getattr(settings, "max_requests_per_worker", 0)
    path = getattr(settings, "recycle_file", "")
    if not limit or not path:
        return None
    return Recycler(path, limit, settings.max_requests_jitter)

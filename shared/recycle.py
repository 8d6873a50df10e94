"""--max-requests-per-worker: a worker process of a `--workers N` service restarts itself after serving that many
requests (plus up to --max-requests-jitter more, so that workers do not restart together), as gunicorn's
max_requests does. It bounds what one process can accumulate that no code of ours can free: grpc.aio leaks a few
hundred bytes natively on some cancelled streams (its own send batch in flight when a server call is cancelled,
grpc/grpc#43360; loadtest/cancel_leak.py).

A worker at its limit only says so (it touches its recycle file) and goes on serving; the supervisor
(shared/workers.py) recycles one worker at a time, so the others always serve: it sends that worker SIGTERM,
the worker drains as on any SIGTERM (new requests answered UNAVAILABLE SHUTTING_DOWN + RetryInfo, which the
gateway retries on another router worker; streams finish within the grace period) and exits 0, and its
replacement starts at once on the same ports. A worker may also be given a gate, asked (at most once per
GATE_RECHECK_S) before it says so: an engine replica goes only while another replica of its model serves."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

log = structlog.get_logger("fleetserve.workers")


# A worker whose gate said "not now" asks again after this long (on its next request).
GATE_RECHECK_S = 1.0


class Recycler:
    """Counts a worker's requests; at its limit, asks the supervisor (once) to recycle this worker. With a `gate`
    (an async predicate), only once the gate allows it: it is asked in a task of its own, off the request."""

    __slots__ = ("limit", "served", "triggered", "path", "gate", "_checking", "_next_check", "_deferred")

    def __init__(
        self,
        path: str,
        max_requests: int,
        jitter: int = 0,
        rng: random.Random | None = None,
        gate: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.path = path
        self.limit = max_requests + (rng or random.Random()).randint(0, max(0, jitter))
        self.served = 0
        self.triggered = False
        self.gate = gate
        self._checking: asyncio.Task | None = None
        self._next_check = 0.0
        self._deferred = False

    def served_one(self) -> None:
        self.served += 1
        if self.served < self.limit or self.triggered:
            return
        if self.gate is None:
            self._trigger()
            return
        now = time.monotonic()
        if self._checking is None and now >= self._next_check:
            self._next_check = now + GATE_RECHECK_S
            self._checking = asyncio.get_running_loop().create_task(
                self._ask_gate(), name="worker.recycle_gate"
            )

    async def _ask_gate(self) -> None:
        try:
            allowed = await self.gate()
        except Exception as e:  # the gate's own failure (e.g. its registry unreachable): ask again later
            log.warning("worker.recycle_gate_failed", error=repr(e))
            allowed = False
        finally:
            self._checking = None
        if allowed and not self.triggered:
            self._trigger()
        elif not allowed and not self._deferred:
            self._deferred = True  # said once; it asks again every GATE_RECHECK_S while requests come
            log.info("worker.recycle_deferred", served=self.served, limit=self.limit)

    def _trigger(self) -> None:
        self.triggered = True
        log.info("worker.recycle_due", served=self.served, limit=self.limit)
        Path(self.path).touch()


def recycler(settings, gate: Callable[[], Awaitable[bool]] | None = None) -> Recycler | None:
    """The worker's Recycler (asking `gate` before it goes, when given), or None (not a supervised worker, or no
    limit set)."""
    limit = getattr(settings, "max_requests_per_worker", 0)
    path = getattr(settings, "recycle_file", "")
    if not limit or not path:
        return None
    return Recycler(path, limit, settings.max_requests_jitter, gate=gate)

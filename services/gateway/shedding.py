"""Load shedding and graceful degradation: the fleet's saturation per model (queued requests per routable
replica, from the router's GetStatus, polled in the background), and what to do with a request of each tier
when it is over a threshold: batch first, then standard, are refused, or degraded when configured; interactive
is always admitted."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import grpc
import structlog
from fleetserve.common.v1 import common_pb2
from fleetserve.router.v1 import router_service_pb2 as router_pb

from shared.errors import ResourceExhausted

log = structlog.get_logger(__name__)

BATCH = common_pb2.PRIORITY_BATCH
STANDARD = common_pb2.PRIORITY_STANDARD
INTERACTIVE = common_pb2.PRIORITY_INTERACTIVE
_TIER_NAMES = {INTERACTIVE: "interactive", STANDARD: "standard", BATCH: "batch"}
# Depth readings older than this many polls (and at least _STALE_MIN_S) are not acted on: a router we cannot
# reach must not make us shed everything, while a busy event loop that polls late must not stop shedding.
_STALE_AFTER_POLLS = 5
_STALE_MIN_S = 3.0


def queue_depths(status: router_pb.GetStatusResponse) -> dict[str, float]:
    """Per model: requests waiting (the router's admission queue plus the engines' own queues) per routable
    replica. A model with waiting requests and no routable replica is infinitely deep."""
    waiting: dict[str, float] = {}
    replicas: dict[str, int] = {}
    for q in status.queues:
        waiting[q.model] = waiting.get(q.model, 0) + q.interactive + q.standard + q.batch
    for r in status.replicas:
        if r.routable:
            replicas[r.model] = replicas.get(r.model, 0) + 1
            waiting[r.model] = waiting.get(r.model, 0) + r.load.waiting
    return {
        m: (w / replicas[m] if replicas.get(m) else (float("inf") if w else 0.0)) for m, w in waiting.items()
    }


@dataclass(frozen=True, slots=True)
class Decision:
    """Admit unchanged (model None, max_tokens None, note ""), or admit degraded, saying how in note."""

    model: str | None = None
    max_tokens: int | None = None
    note: str = ""


class LoadShedder:
    """Refuses or degrades requests while their model's queue depth is at or over the tier's threshold
    (0 disables a tier's shedding). Degradation, when configured, is tried before refusing: a smaller model
    from degrade_models (if that model is under the threshold) and/or max_tokens capped at degrade_max_tokens."""

    def __init__(
        self,
        fetch_status: Callable[[], Awaitable[router_pb.GetStatusResponse]],
        *,
        batch_depth: float = 0.0,
        standard_depth: float = 0.0,
        poll_s: float = 0.5,
        degrade_models: Mapping[str, str] | None = None,
        degrade_max_tokens: int = 0,
        retry_base_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch_status
        self.thresholds = {BATCH: batch_depth, STANDARD: standard_depth}
        self.poll_s = poll_s
        self.degrade_models = dict(degrade_models or {})
        self.degrade_max_tokens = degrade_max_tokens
        self.retry_base_s = retry_base_s
        self._clock = clock
        self.depths: dict[str, float] = {}
        self._read_at = -float("inf")
        self._task: asyncio.Task | None = None

    @property
    def enabled(self) -> bool:
        return any(v > 0 for v in self.thresholds.values())

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.get_running_loop().create_task(self._poll_loop(), name="load-shedder")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll_loop(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.poll_s)

    async def poll_once(self) -> None:
        try:
            self.update(queue_depths(await self._fetch()))
        except grpc.aio.AioRpcError as e:
            log.debug("gateway.load_poll_failed", code=e.code().name)

    def update(self, depths: dict[str, float]) -> None:
        self.depths = depths
        self._read_at = self._clock()

    def decide(self, model: str, priority: int, max_tokens: int) -> Decision:
        """The decision for a request of this (effective) priority; raises ResourceExhausted to shed."""
        threshold = self.thresholds.get(priority, 0.0)
        stale_s = max(_STALE_AFTER_POLLS * self.poll_s, _STALE_MIN_S)
        if threshold <= 0 or self._clock() - self._read_at > stale_s:
            return Decision()
        depth = self.depths.get(model, 0.0)
        if depth < threshold:
            return Decision()
        smaller = self.degrade_models.get(model)
        notes = []
        decision_model = None
        if smaller and self.depths.get(smaller, 0.0) < threshold:
            decision_model = smaller
            notes.append(f"model {model} is saturated: served by {smaller}")
        capped = None
        if self.degrade_max_tokens and max_tokens > self.degrade_max_tokens:
            capped = self.degrade_max_tokens
            notes.append(f"max_tokens capped at {capped} under load")
        if notes:
            return Decision(decision_model, capped, "; ".join(notes))
        tier = _TIER_NAMES.get(priority, "standard")
        # The deeper the queue past the threshold, the longer to wait: about the time it takes to drain.
        wait = min(30.0, self.retry_base_s * depth / threshold) if depth != float("inf") else 30.0
        raise ResourceExhausted(
            f"the fleet is saturated for {model} ({depth:.1f} queued per replica); {tier} requests are shed, "
            f"retry in {wait:.1f} s",
            reason="LOAD_SHED",
            retry_after_s=round(wait, 3),
            quota_violations=[(f"model:{model}", f"{tier} tier shed at queue depth {threshold:g}")],
            metadata={"model": model, "tier": tier},
        )

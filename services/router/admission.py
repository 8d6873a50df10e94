"""The router's admission queue: when every replica of a model is at its in-flight cap, requests wait here,
served by tier (interactive before standard before batch) and, within a tier, fairly across tenants."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetserve.common.v1 import common_pb2

from shared.errors import DeadlineExceeded, ResourceExhausted

# Queue order of the tiers; retries and resumes of requests already admitted go before all of them.
URGENT = -1
TIER_RANK = {
    common_pb2.PRIORITY_INTERACTIVE: 0,
    common_pb2.PRIORITY_STANDARD: 1,
    common_pb2.PRIORITY_UNSPECIFIED: 1,
    common_pb2.PRIORITY_BATCH: 2,
}
TIER_NAMES = ("interactive", "standard", "batch")


@dataclass(order=True)
class _Waiter:
    rank: int
    start_tag: float
    seq: int
    tenant: str = field(compare=False)
    future: asyncio.Future = field(compare=False)
    # False once pump() has taken it off the heap (woken, or dropped because its caller was cancelled).
    queued: bool = field(default=True, compare=False)


class _Tier:
    """Start-time fair queueing (Goyal et al., SFQ) over tenants within one tier: a request's start tag is
    max(virtual time, its tenant's previous finish tag); the smallest start tag goes first and sets the virtual
    time. A tenant with many requests queued gets every other slot, not all of them, and a tenant that was
    idle does not bank credit. Hand-written: no maintained library offers an asyncio fair queue."""

    __slots__ = ("vtime", "finish")

    def __init__(self) -> None:
        self.vtime = 0.0
        self.finish: dict[str, float] = {}

    def tag(self, tenant: str, cost: float = 1.0) -> float:
        start = max(self.vtime, self.finish.get(tenant, 0.0))
        self.finish[tenant] = start + cost
        return start

    def served(self, start_tag: float) -> None:
        self.vtime = max(self.vtime, start_tag)


class _ModelQueue:
    __slots__ = ("heap", "tiers", "reserved", "counts")

    def __init__(self) -> None:
        self.heap: list[_Waiter] = []
        self.tiers = [_Tier() for _ in TIER_NAMES]
        self.reserved = 0  # waiters woken whose attempt has not started yet
        self.counts = [0, 0, 0]  # waiting per tier (URGENT counted as interactive)


class AdmissionQueue:
    """Per-model admission. `free_slots(model)` says how many more attempts the model's replicas take now
    (None: the model has no routable replica, so waiting is pointless and the caller fails at once)."""

    def __init__(
        self,
        free_slots: Callable[[str], int | None],
        max_waiting: int = 1000,
        retry_after_s: float = 1.0,
        wakes: Callable[[str], bool] = lambda model: False,
    ) -> None:
        self._free_slots = free_slots
        # Models whose requests wait for a replica to start when there is none (scale to zero, cold starts)
        # instead of failing at once.
        self._wakes = wakes
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self._queues: dict[str, _ModelQueue] = {}
        self._seq = itertools.count()

    def waiting(self) -> dict[str, list[int]]:
        """Model -> waiting requests per tier (interactive, standard, batch)."""
        return {m: list(q.counts) for m, q in sorted(self._queues.items()) if q.heap}

    async def acquire(
        self, model: str, priority: int, tenant: str, timeout_s: float, urgent: bool = False
    ) -> None:
        """Return when an attempt may start: at once while slots are free and nobody waits, else in queue
        order. A model with no routable replica fails at once in choosing, unless it wakes: then the request
        waits here (counted in waiting(), which the autoscaler reads) until a replica is routable. Raises
        ResourceExhausted when the queue is full and DeadlineExceeded after timeout_s."""
        q = self._queues.get(model)
        free = self._free_slots(model)
        if free is None:
            if not self._wakes(model):
                return  # no routable replica: choosing will say why
            free = 0
        if q is None:
            q = self._queues[model] = _ModelQueue()
        if not q.heap and free - q.reserved > 0:
            return
        if len(q.heap) >= self.max_waiting:
            raise ResourceExhausted(
                f"every replica of model {model!r} is busy and {len(q.heap)} requests are queued",
                reason="ROUTER_QUEUE_FULL",
                retry_after_s=self.retry_after_s,
                metadata={"model": model},
            )
        rank = URGENT if urgent else TIER_RANK.get(priority, 1)
        tier_index = max(rank, 0)
        start = q.tiers[tier_index].tag(tenant or "-") if rank >= 0 else 0.0
        waiter = _Waiter(rank, start, next(self._seq), tenant, asyncio.get_running_loop().create_future())
        heapq.heappush(q.heap, waiter)
        q.counts[tier_index] += 1
        try:
            async with asyncio.timeout(timeout_s):
                await waiter.future
        except BaseException as e:
            if waiter.future.done() and not waiter.future.cancelled():
                # Woken, but going away (deadline, cancellation): hand the slot to the next one.
                q.reserved -= 1
                self.pump(model)
            elif waiter.queued:
                q.heap.remove(waiter)
                heapq.heapify(q.heap)
                q.counts[tier_index] -= 1
            # else: pump() already dropped it (its future was cancelled before this task ran again).
            if isinstance(e, TimeoutError):
                raise DeadlineExceeded(
                    f"deadline exceeded while queued for a replica of model {model!r}"
                ) from None
            raise
        q.reserved -= 1

    def pump(self, model: str) -> None:
        """Wake as many waiters of model as there are free slots (call when a slot frees or replicas change)."""
        q = self._queues.get(model)
        if q is None or not q.heap:
            return
        free = self._free_slots(model)
        if free is None:
            if self._wakes(model):
                return  # they wait for a replica to start
            free = len(q.heap)  # no replica left: let them all go and fail fast in choosing
        while q.heap and free - q.reserved > 0:
            w = heapq.heappop(q.heap)
            w.queued = False
            tier_index = max(w.rank, 0)
            q.counts[tier_index] -= 1
            if w.future.done():
                # Its caller was cancelled and has not run its clean-up yet: it takes no slot and no turn.
                if not q.counts[tier_index] and w.rank >= 0:
                    q.tiers[w.rank].finish.clear()
                continue
            if w.rank >= 0:
                tier = q.tiers[w.rank]
                tier.served(w.start_tag)
                if not q.counts[tier_index]:
                    tier.finish.clear()  # nobody of this tier waits: no tenant keeps credit or debt
            q.reserved += 1
            w.future.set_result(None)

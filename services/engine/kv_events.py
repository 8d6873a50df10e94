"""KvEventHub: fans a backend's KV-event batches out to SubscribeKvEvents streams, each with its own bounded
queue and seq numbers, so a slow subscriber sees a gap instead of growing the engine's memory."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable

from fleetserve.engine.v1 import engine_service_pb2 as pb

# Batches kept per subscriber; older ones are dropped (a gap in seq) when the subscriber lags this far.
DEFAULT_MAX_PENDING = 1024


class _Subscriber:
    """One stream's queue: the next seq to assign and the batches not yet read."""

    __slots__ = ("queue", "seq", "wake", "closed")

    def __init__(self, max_pending: int) -> None:
        self.queue: deque[pb.KvEventBatch] = deque(maxlen=max_pending)
        self.seq = 0
        self.wake = asyncio.Event()
        self.closed = False

    def put(self, batch: pb.KvEventBatch) -> None:
        self.seq += 1
        batch.seq = self.seq
        # A full deque drops its oldest batch: that seq never arrives, which is the subscriber's gap.
        self.queue.append(batch)
        self.wake.set()


class KvEventHub:
    """Publish once per engine step; every subscriber gets its own copy of the batch with its own seq.

    Everything runs on the event loop thread (publish from the step loop, subscribe from RPC handlers), so a
    snapshot taken at subscribe() and the live batches after it never miss or repeat an event."""

    def __init__(self, *, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1; got {max_pending}")
        self.max_pending = max_pending
        self._subs: set[_Subscriber] = set()
        self._closed = False

    @property
    def active(self) -> bool:
        """Whether anyone listens: a publisher skips building events when no one does."""
        return bool(self._subs)

    def publish(self, events: Iterable[pb.KvEvent], ts: float | None = None) -> None:
        """Send one step's events (in order) to every subscriber; nothing is sent for no events."""
        events = list(events)
        if not events or not self._subs:
            return
        ts = time.time() if ts is None else ts
        for sub in self._subs:
            sub.put(pb.KvEventBatch(ts=ts, events=events))

    async def subscribe(
        self, include_snapshot: bool, snapshot: Callable[[], list[pb.KvEvent]]
    ) -> AsyncIterator[pb.KvEventBatch]:
        """A stream of batches; first a snapshot batch of snapshot()'s events when asked. Ends at close()."""
        if self._closed:
            return
        sub = _Subscriber(self.max_pending)
        if include_snapshot:
            sub.put(pb.KvEventBatch(ts=time.time(), events=snapshot(), snapshot=True))
        self._subs.add(sub)
        try:
            while True:
                while sub.queue:
                    yield sub.queue.popleft()
                if sub.closed:
                    return
                sub.wake.clear()
                await sub.wake.wait()
        finally:
            self._subs.discard(sub)

    def close(self) -> None:
        """End every stream (after the batches already queued) and refuse new subscriptions."""
        self._closed = True
        for sub in self._subs:
            sub.closed = True
            sub.wake.set()


def block_stored(hashes: list[int], parent: int | None, token_ids: list[int], block_size: int) -> pb.KvEvent:
    """A BlockStored event for a chain of full blocks."""
    stored = pb.BlockStored(block_hashes=hashes, token_ids=token_ids, block_size=block_size)
    if parent is not None:
        stored.parent_block_hash = parent
    return pb.KvEvent(block_stored=stored)


def block_removed(hashes: list[int]) -> pb.KvEvent:
    """A BlockRemoved event."""
    return pb.KvEvent(block_removed=pb.BlockRemoved(block_hashes=hashes))

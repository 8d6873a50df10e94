"""Following one part of the shared store: read, reconcile, watch from the read's revision, again after a break."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from typing import Protocol, TypeVar

import structlog

from services.registry.store import StoreError
from shared.resilience import full_jitter

log = structlog.get_logger(__name__)

Read = TypeVar("Read")
Event = TypeVar("Event")


class Counter(Protocol):
    """A Prometheus counter (or one labelled child of one)."""

    def inc(self) -> None: ...


class Gauge(Protocol):
    """A Prometheus gauge (or one labelled child of one)."""

    def set(self, value: float) -> None: ...


# Not shared.watching.follow (how routers follow the registry's WatchReplicas stream): it marks itself connected on
# the stream's first message, which the registry sends at once (a snapshot) but a quiet etcd watch never sends, so a
# healthy watch of an idle store would read as down for as long as nobody writes; its stream carries its own
# snapshot, where an etcd watch needs a separate read to close the gap of a break; and it logs every failed retry.
# Here "up" means a fresh read was reconciled and the watch from that read's revision is open, and a break is
# counted and logged once however many retries it takes.
async def follow(
    read: Callable[[], Awaitable[tuple[Read, int]]],
    reconcile: Callable[[Read, int], int],
    watch: Callable[[int], AsyncIterator[Event]],
    apply: Callable[[Event], object],
    *,
    breaks: Counter,
    up: Gauge,
    event: str,
    fields: Mapping[str, object] | None = None,
    backoff_base_s: float = 0.1,
    backoff_max_s: float = 5.0,
) -> None:
    """Until cancelled: read() (what is stored, and the store revision it was read at), reconcile(read, revision)
    memory with it (returning how many things changed), then apply() every event of watch(revision). A watch that
    breaks or ends is read and watched again after full-jitter backoff (reset once events flow). Each break
    increments `breaks`, sets `up` to 0 until the next reconciled read, and logs `<event>_broken` once and
    `<event>_resumed` (with down_s) when it is over; `fields` go on both lines."""
    # Every (re)subscription reads afresh and watches from that read's revision: the read covers whatever happened
    # before (since start, or while the watch was down) and the watch everything after, with no gap between them.
    # A watch resumed from the last event's revision instead could not recover once etcd compacted that revision,
    # and a deletion missed during the gap would need the read anyway.
    fields = dict(fields or {})
    attempt = 0  # consecutive failed attempts since the watch last delivered something
    broken_at: float | None = None  # when the current break began (None: not broken)
    while True:
        try:
            stored, revision = await read()
            changed = reconcile(stored, revision)
            if broken_at is not None:
                down_s = round(time.monotonic() - broken_at, 3)
                log.info(f"{event}_resumed", **fields, changed=changed, down_s=down_s)
                broken_at = None
            # Up from here: what was missed is applied, and the watch from this read's revision follows.
            up.set(1)
            async with aclosing(watch(revision)) as events:
                async for ev in events:
                    attempt = 0
                    apply(ev)
            error = "watch ended"
        except StoreError as e:
            error = str(e)
        except Exception as e:  # a bug or a bad record must not stop following for good
            error = repr(e)
        delay = full_jitter(attempt, backoff_base_s, backoff_max_s)
        if broken_at is None:  # once per break, not once per failed retry while the store stays away
            broken_at = time.monotonic()
            breaks.inc()
            up.set(0)
            log.warning(f"{event}_broken", **fields, error=error[:300], retry_in_s=round(delay, 3))
        attempt += 1
        await asyncio.sleep(delay)

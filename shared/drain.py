"""Graceful stop for services that relay long streams (gateway, router): while draining, new requests are
answered UNAVAILABLE + RetryInfo (the port stays open, so a client is told rather than refused a connection);
in-flight streams may finish until shortly before the grace period ends, and those still running then are cut
with UNAVAILABLE, ErrorInfo SHUTTING_DOWN and RetryInfo, a status a client (or a gateway with other routers)
can act on, instead of gRPC's bare "Cancelling all calls"."""

from __future__ import annotations

import asyncio

import structlog

from shared.errors import ShuttingDown

log = structlog.get_logger(__name__)


def cancelled_by_caller() -> bool:
    """Whether this task itself is being cancelled (its caller went away), rather than a call it awaited having
    been cancelled by someone else (a drain's cut, a stall watchdog)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Drain:
    """A service's drain state and its in-flight downstream calls (what a cut cancels)."""

    def __init__(self, service: str, retry_after_s: float = 1.0) -> None:
        self.service = service
        self.retry_after_s = retry_after_s
        self.draining = False
        self.cutting = False
        self._calls: set = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def error(self, what: str = "new requests") -> ShuttingDown:
        return ShuttingDown(
            f"this {self.service} is shutting down and takes no {what}; retry (another {self.service} "
            "will serve it)",
            retry_after_s=self.retry_after_s,
            metadata={"service": self.service},
        )

    def check(self) -> None:
        """Raise ShuttingDown when draining (called where a request starts)."""
        if self.draining:
            raise self.error()

    def track(self, call) -> None:
        """A downstream call (anything with cancel()) that a cut ends."""
        self._calls.add(call)
        self._idle.clear()

    def untrack(self, call) -> None:
        self._calls.discard(call)
        if not self._calls:
            self._idle.set()

    def cut_reason(self) -> ShuttingDown | None:
        """The error for a stream whose downstream call was cancelled by the cut (None: not cutting)."""
        return self.error("more time for this stream") if self.cutting else None

    @property
    def active(self) -> int:
        return len(self._calls)

    async def run(self, grace_s: float) -> None:
        """Drain: refuse new requests from now, wait for in-flight calls to end until a margin before grace_s
        ends (a second, or a quarter of a short grace), then cut the rest. Returns once they are cut."""
        self.draining = True
        margin = min(1.0, grace_s / 4)
        log.info(
            "drain.started", service=self.service, in_flight=self.active, cut_in_s=round(grace_s - margin, 3)
        )
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, grace_s - margin))
        except TimeoutError:
            pass
        if self._calls:
            self.cutting = True
            log.warning("drain.cutting_streams", service=self.service, streams=len(self._calls))
            for call in list(self._calls):
                call.cancel()

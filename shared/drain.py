"""Graceful stop for services that relay long streams (gateway, router): in-flight streams may finish until
shortly before the grace period ends, and those still running then are cut with UNAVAILABLE, ErrorInfo
SHUTTING_DOWN and RetryInfo, a status a client (or a gateway with other routers) can act on, instead of gRPC's
bare "Cancelling all calls". New requests are answered UNAVAILABLE + RetryInfo meanwhile (the port stays open, so
a client is told rather than refused a connection), except in a worker whose siblings go on serving the port: it
hands its clients over (GOAWAY, Connection: close) and serves what still reaches it on a connection it had open."""

from __future__ import annotations

import asyncio
import functools
import time

import structlog

from shared.errors import ShuttingDown

log = structlog.get_logger(__name__)

# While a drain waits, it looks at its streams' progress this often (only then, never while serving), so that each
# stream it cuts is logged with how long it had been silent.
PROGRESS_SAMPLE_S = 0.25


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
        # Serve new requests while draining (until the cut): clients are being sent to sibling workers.
        self.serve_new = False
        self._calls: set = set()
        # Requests in our code (check() passed, done() not yet), tracked or not: while none is, whatever the
        # server still holds was never handed to us (shared.server.drain_and_stop cancels it).
        self.busy = 0
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
        """Raise ShuttingDown when draining (called where a request starts); when handing over, only once the
        cut began (a request that starts then would be cut at once). A request let through is one of ours
        until its done() (busy)."""
        if self.draining and (self.cutting or not self.serve_new):
            raise self.error()
        self.busy += 1

    def done(self) -> None:
        """A request check() let through has ended."""
        self.busy -= 1

    def idle(self) -> bool:
        """No request is in our code (busy == 0): what shared.server.drain_and_stop(idle=...) waits for."""
        return self.busy == 0

    def counted(self, fn):
        """fn, an RPC with one response (ListModels, Feedback, ...), busy while it runs, so that a drain's stop
        waits for it as for a stream instead of cancelling it LEFTOVER_S after the last stream. Never refused:
        such a call is short and its answer still true while we drain (a stream's check() refuses)."""

        @functools.wraps(fn)
        async def counted(request, context):
            self.busy += 1
            try:
                return await fn(request, context)
            finally:
                self.busy -= 1

        return counted

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

    @staticmethod
    def cut_at(grace_s: float) -> float:
        """Seconds after a drain starts when it cuts the streams left: a margin (a second, or a quarter of a
        short grace) before grace_s ends, so that their statuses go out before the server's own stop."""
        return grace_s - min(1.0, grace_s / 4)

    async def run(self, grace_s: float, serve_new: bool = False) -> None:
        """Drain: refuse new requests from now (serve_new: serve them until the cut), wait until no call is in
        flight (those that start meanwhile included) or cut_at(grace_s), then cut the rest. Returns once they
        are cut."""
        self.draining, self.serve_new = True, serve_new
        cut_in_s = self.cut_at(grace_s)
        log.info(
            "drain.started",
            service=self.service,
            in_flight=self.active,
            cut_in_s=round(cut_in_s, 3),
            hand_over=serve_new,
        )
        started = time.monotonic()
        deadline = started + max(0.0, cut_in_s)
        # Each stream's progress() (where it has one) and when it was last seen changing, or first seen.
        seen: dict[object, tuple[object, float]] = {}
        # Until the cut, wait while any stream is in flight, one that started after the drain did too (serve_new,
        # or a request already past check()): the idle event may fire and a new stream be tracked before this
        # task runs again, and that stream must not be cut at once (its client would get SHUTTING_DOWN seconds
        # before the grace period ends, instead of its answer).
        while self._calls and (left := deadline - time.monotonic()) > 0:
            _sample(self._calls, seen, time.monotonic())
            try:
                await asyncio.wait_for(self._idle.wait(), min(left, PROGRESS_SAMPLE_S))
            except TimeoutError:
                pass
        if self._calls:
            self.cutting = True
            now = time.monotonic()
            _sample(self._calls, seen, now)
            log.warning(
                "drain.cutting_streams",
                service=self.service,
                streams=len(self._calls),
                drain_s=round(now - started, 3),
            )
            for call in list(self._calls):
                # Per stream: what it was doing (describe(): its request, where it sits) and how long it had been
                # silent (since it was first seen, if it never moved), so that a cut explains itself.
                log.warning(
                    "drain.cutting_stream",
                    service=self.service,
                    silent_s=round(now - seen[call][1], 3),
                    **_about(call),
                )
                call.cancel()


def _sample(calls, seen: dict, now: float) -> None:
    """Note when each call's progress() (None without one) was last seen changing, or first seen."""
    for call in calls:
        progress = getattr(call, "progress", None)
        count = progress() if progress is not None else None
        before = seen.get(call)
        if before is None or before[0] != count:
            seen[call] = (count, now)


def _about(call) -> dict:
    """call.describe(), where it has one; one that fails must not keep the cut from the other streams."""
    describe = getattr(call, "describe", None)
    if describe is None:
        return {}
    try:
        return describe()
    except Exception as e:  # noqa: BLE001 - diagnostics only
        return {"describe_error": repr(e)}

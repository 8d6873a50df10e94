"""Resilience primitives shared by the services: full-jitter backoff, a circuit breaker, a retry budget and
which gRPC failures are the server's fault."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

import grpc

from fleetserve.client.retry import full_jitter  # noqa: F401  (one backoff for servers and clients)

# -- classifying failures -----------------------------------------------------------------------------

# The server (a replica) failed: its process died or reset the stream, it crashed on the request, or it
# cancelled the call itself (a shutdown past its grace period). Counted by breakers and retried elsewhere.
SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.CANCELLED,
    }
)
# The server is busy: worth another server, but no sign the server is broken.
BACKPRESSURE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})


def is_server_fault(code: grpc.StatusCode, caller_deadline_passed: bool = False) -> bool:
    """Whether a failed call is the called server's fault. DEADLINE_EXCEEDED counts only while the caller's own
    deadline has not passed (the server timed out on a shorter, per-attempt limit); client errors
    (INVALID_ARGUMENT, NOT_FOUND, ...) and backpressure (RESOURCE_EXHAUSTED) never count. CANCELLED counts
    because a caller's own cancellation never arrives as a status: it is a CancelledError in the caller."""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return not caller_deadline_passed
    return code in SERVER_FAULTS


def is_retryable(code: grpc.StatusCode, caller_deadline_passed: bool = False) -> bool:
    """Whether another server may succeed where this one failed: server faults and backpressure."""
    return code in BACKPRESSURE or is_server_fault(code, caller_deadline_passed)


# -- circuit breaker ----------------------------------------------------------------------------------


class BreakerState(enum.IntEnum):
    """States of a circuit breaker (the values are what gauges report)."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Closed -> open after `failure_threshold` consecutive faults; open for `open_s` (doubling on each
    re-open, up to `max_open_s`); then half-open, letting `half_open_probes` calls through at a time: a success
    closes it, a fault re-opens it.

    Hand-written rather than pybreaker/aiobreaker: those wrap one call (a function or coroutine), while a
    router chooses among replicas first (it needs `allows()` without making a call) and learns the outcome of
    a stream much later, from another place in the code; both libraries also read the wall clock directly."""

    __slots__ = (
        "failure_threshold",
        "open_s",
        "max_open_s",
        "half_open_probes",
        "on_change",
        "_clock",
        "state",
        "failures",
        "opened",
        "_open_until",
        "_open_for",
        "_probes",
    )

    def __init__(
        self,
        failure_threshold: int = 3,
        open_s: float = 5.0,
        max_open_s: float = 60.0,
        half_open_probes: int = 1,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        if failure_threshold < 1 or half_open_probes < 1 or open_s < 0 or max_open_s < open_s:
            raise ValueError("failure_threshold and half_open_probes must be >= 1, 0 <= open_s <= max_open_s")
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self.max_open_s = max_open_s
        self.half_open_probes = half_open_probes
        self.on_change = on_change
        self._clock = clock
        self.state = BreakerState.CLOSED
        self.failures = 0  # consecutive faults while closed
        self.opened = 0  # times opened since start
        self._open_until = 0.0
        self._open_for = open_s
        self._probes = 0  # half-open calls in flight

    def _set(self, state: BreakerState) -> None:
        old, self.state = self.state, state
        if old != state and self.on_change is not None:
            self.on_change(old, state)

    def current(self) -> BreakerState:
        """The state now (an open breaker whose time is up reads as half-open)."""
        if self.state is BreakerState.OPEN and self._clock() >= self._open_until:
            self._set(BreakerState.HALF_OPEN)
        return self.state

    def allows(self) -> bool:
        """Whether a new call may go through now (no side effect beyond the open -> half-open transition)."""
        state = self.current()
        if state is BreakerState.CLOSED:
            return True
        return state is BreakerState.HALF_OPEN and self._probes < self.half_open_probes

    def on_call(self) -> None:
        """A call was sent (after allows()); in half-open it takes a probe slot until its outcome is known."""
        if self.current() is BreakerState.HALF_OPEN:
            self._probes += 1

    def on_success(self) -> None:
        """The call succeeded (or at least the server answered): closes a half-open breaker."""
        self.failures = 0
        if self.state is not BreakerState.CLOSED:
            self._probes = 0
            self._open_for = self.open_s
            self._set(BreakerState.CLOSED)

    def on_fault(self) -> None:
        """The call failed by the server's fault."""
        if self.state is BreakerState.CLOSED:
            self.failures += 1
            if self.failures >= self.failure_threshold:
                self._open(self.open_s)
        elif self.state is BreakerState.HALF_OPEN:
            # The probe failed: stay out longer this time.
            self._open(min(self.max_open_s, self._open_for * 2))
        # Already open: stragglers started before it opened change nothing.

    def trip(self) -> None:
        """Open now, without waiting for failure_threshold faults (a replica seen hung: no call would fail, they
        would only never end). A trip while half-open stays out twice as long, as a failed probe does."""
        if self.state is BreakerState.OPEN:
            return
        self._open(
            self.open_s if self.state is BreakerState.CLOSED else min(self.max_open_s, self._open_for * 2)
        )

    def on_neutral(self) -> None:
        """The call ended with no verdict on the server (the caller went away, a client error)."""
        if self.state is BreakerState.HALF_OPEN and self._probes > 0:
            self._probes -= 1

    def _open(self, duration_s: float) -> None:
        self._open_for = duration_s
        self._open_until = self._clock() + duration_s
        self._probes = 0
        self.failures = 0
        self.opened += 1
        self._set(BreakerState.OPEN)

    def open_seconds_left(self) -> float:
        """Seconds until an open breaker turns half-open (0 otherwise)."""
        if self.current() is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._open_until - self._clock())


# -- retry budget ------------------------------------------------------------------------------------


class RetryBudget:
    """gRPC's retry throttling (gRFC A6): a token bucket of `max_tokens`; every failed attempt takes one token,
    every success gives back `token_ratio`; retries are allowed only while more than half the bucket is left.
    When a whole pool fails, retries stop after about max_tokens/2 failures instead of multiplying the load."""

    __slots__ = ("max_tokens", "token_ratio", "tokens", "throttled")

    def __init__(self, max_tokens: float = 10.0, token_ratio: float = 0.1) -> None:
        if max_tokens <= 0 or token_ratio <= 0:
            raise ValueError("max_tokens and token_ratio must be > 0")
        self.max_tokens = max_tokens
        self.token_ratio = token_ratio
        self.tokens = max_tokens
        self.throttled = 0  # retries refused since start

    def on_failure(self) -> None:
        self.tokens = max(0.0, self.tokens - 1.0)

    def on_success(self) -> None:
        self.tokens = min(self.max_tokens, self.tokens + self.token_ratio)

    def can_retry(self) -> bool:
        """Whether a retry may be sent now (counts a refusal in `throttled`)."""
        if self.tokens > self.max_tokens / 2:
            return True
        self.throttled += 1
        return False

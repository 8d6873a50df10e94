"""When a client retries: only calls that are safe to repeat (a stream that has sent nothing yet, an idempotent
unary call), only for failures another try may fix, after the server's RetryInfo delay or a full-jitter backoff,
and never past the caller's deadline."""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

from fleetserve.client.errors import ErrorDetails


def full_jitter(attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Delay before retry number `attempt` (0-based): uniform in [0, min(cap, base * 2**attempt)], so many
    clients retrying together (a fleet restarted at once, routers reconnecting) do not retry in lockstep."""
    # Bound the exponent: 2**attempt overflows a float long before anyone retries that often.
    ceiling = min(cap_s, base_s * 2 ** min(attempt, 32))
    return (rng or random).uniform(0.0, ceiling)


@dataclass(frozen=True)
class RetryPolicy:
    """How a client retries. UNAVAILABLE is retried (the fleet could not serve it now), and so is CANCELLED that
    the server sent without a fleetserve reason (gRPC's answer to a call it had queued but not yet handed to the
    gateway's code when that gateway process stopped: nothing ran); RESOURCE_EXHAUSTED only when the server
    advised a delay (RetryInfo) no longer than max_advised_delay_s (a rate limit that frees up soon, not a budget
    that resets next month); nothing else (the caller's own fault, or not worth repeating). A stream retries
    only before its first chunk (after it, resume_delay decides)."""

    max_attempts: int = 4
    backoff_base_s: float = 0.1
    backoff_max_s: float = 5.0
    max_advised_delay_s: float = 30.0
    # Added to an advised delay, up to this fraction of it, so clients told "1 s" do not return together.
    advised_jitter: float = 0.1
    # A stream that broke after chunks arrived (UNAVAILABLE: the gateway it reached died or went away) goes on
    # through another attempt from the last token received (resume_token_ids), nothing lost or repeated.
    resume: bool = True

    def resume_delay(
        self, details: ErrorDetails, attempt: int, time_left_s: float | None, rng: random.Random | None = None
    ) -> float | None:
        """Seconds to wait before resuming a stream that broke mid-way with details; None: give up."""
        if not self.resume or details.code != grpc.StatusCode.UNAVAILABLE:
            return None
        return self.delay(details, attempt, time_left_s, rng)

    def delay(
        self, details: ErrorDetails, attempt: int, time_left_s: float | None, rng: random.Random | None = None
    ) -> float | None:
        """Seconds to wait before the next attempt after `attempt` (1-based) failed with details; None: give up."""
        if attempt >= self.max_attempts:
            return None
        advised = details.retry_after_s
        if details.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            if advised is None or advised > self.max_advised_delay_s:
                return None
        elif details.code == grpc.StatusCode.CANCELLED:
            if details.reason or advised is not None:
                return None  # a fleetserve service's own answer (it has details), not a call nothing ran
        elif details.code != grpc.StatusCode.UNAVAILABLE:
            return None
        rng = rng or random
        if advised is not None:
            wait = advised + rng.uniform(0.0, advised * self.advised_jitter)
        else:
            wait = full_jitter(attempt - 1, self.backoff_base_s, self.backoff_max_s, rng)
        if time_left_s is not None and wait >= time_left_s:
            return None  # the answer would come after the caller stopped waiting
        return wait


NO_RETRY = RetryPolicy(max_attempts=1, resume=False)

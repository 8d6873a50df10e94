"""RetryPolicy: which failures a client retries, after how long, and when it gives up."""

from __future__ import annotations

import random

import grpc
import pytest

from fleetserve.client import ErrorDetails, RetryPolicy

POLICY = RetryPolicy(max_attempts=4, backoff_base_s=0.1, backoff_max_s=1.0, max_advised_delay_s=30.0)


def failure(code: grpc.StatusCode, retry_after_s: float | None = None) -> ErrorDetails:
    return ErrorDetails(code=code, message="", retry_after_s=retry_after_s)


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
    ],
)
def test_failures_another_try_cannot_fix_are_not_retried(code):
    """The caller's own errors, a spent deadline and server bugs are not retried, advice or not."""
    assert POLICY.delay(failure(code, retry_after_s=0.1), 1, None) is None


def test_a_cancelled_call_the_server_never_ran_is_retried_as_unavailable_is():
    """CANCELLED with no fleetserve details (gRPC's answer to a call queued in a gateway process that stopped)
    is retried with the same backoff; CANCELLED a service sent with a reason is not."""
    rng = random.Random(3)
    waits = [POLICY.delay(failure(grpc.StatusCode.CANCELLED), 1, None, rng) for _ in range(50)]
    assert all(w is not None and 0 <= w <= 0.1 for w in waits)
    assert POLICY.delay(failure(grpc.StatusCode.CANCELLED), 4, None) is None  # max_attempts still holds
    on_purpose = ErrorDetails(code=grpc.StatusCode.CANCELLED, message="", reason="CLIENT_CANCELLED")
    assert POLICY.delay(on_purpose, 1, None) is None


def test_unavailable_without_advice_backs_off_with_full_jitter_up_to_the_cap():
    """UNAVAILABLE: a uniform wait in [0, min(cap, base * 2^(attempt-1))]."""
    rng = random.Random(1)
    for attempt, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4)]:
        waits = [POLICY.delay(failure(grpc.StatusCode.UNAVAILABLE), attempt, None, rng) for _ in range(200)]
        assert all(0 <= w <= ceiling for w in waits) and max(waits) > ceiling * 0.8


def test_advice_is_followed_with_a_little_jitter():
    """RetryInfo sets the wait: the advised delay plus at most 10%, for UNAVAILABLE and RESOURCE_EXHAUSTED."""
    rng = random.Random(2)
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        waits = [POLICY.delay(failure(code, 2.0), 1, None, rng) for _ in range(100)]
        assert all(2.0 <= w <= 2.2 for w in waits)


def test_resource_exhausted_is_retried_only_with_advice_it_can_wait_for():
    """A quota without RetryInfo, or one that frees up later than max_advised_delay_s (a monthly budget), is
    given up at once."""
    assert POLICY.delay(failure(grpc.StatusCode.RESOURCE_EXHAUSTED), 1, None) is None
    assert POLICY.delay(failure(grpc.StatusCode.RESOURCE_EXHAUSTED, 3600.0), 1, None) is None


def test_gives_up_after_max_attempts_or_when_the_wait_outlasts_the_deadline():
    """No attempt beyond max_attempts, and no wait that ends after the caller's deadline."""
    unavailable = failure(grpc.StatusCode.UNAVAILABLE, 0.5)
    assert POLICY.delay(unavailable, 3, None) is not None
    assert POLICY.delay(unavailable, 4, None) is None
    assert POLICY.delay(unavailable, 1, time_left_s=0.4) is None
    assert POLICY.delay(unavailable, 1, time_left_s=5.0) is not None

"""Resilience primitives: full-jitter backoff, failure classification, circuit breaker, retry budget."""

from __future__ import annotations

import random

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.resilience import (
    BreakerState,
    CircuitBreaker,
    RetryBudget,
    full_jitter,
    is_retryable,
    is_server_fault,
)


@given(
    attempt=st.integers(min_value=0, max_value=10_000),
    base=st.floats(min_value=0.001, max_value=10),
    cap=st.floats(min_value=0.001, max_value=60),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_delay_is_within_zero_and_the_capped_exponential(attempt, base, cap, seed):
    """Every delay lies in [0, min(cap, base * 2**attempt)], even for huge attempt numbers."""
    d = full_jitter(attempt, base, cap, random.Random(seed))
    assert 0.0 <= d <= min(cap, base * 2 ** min(attempt, 32))


def test_ceiling_grows_then_caps():
    """The spread of delays doubles per attempt until it reaches the cap."""
    rng = random.Random(3)
    maxima = [max(full_jitter(a, 0.1, 1.0, rng) for _ in range(300)) for a in range(6)]
    assert maxima[0] <= 0.1 < maxima[2]
    assert all(m <= 1.0 for m in maxima)
    assert maxima[5] > 0.9


# -- classification ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code", ["UNAVAILABLE", "INTERNAL", "UNKNOWN", "DATA_LOSS", "CANCELLED", "DEADLINE_EXCEEDED"]
)
def test_replica_faults_count(code):
    """Server-side failures (and a timeout while the caller still had time) are the server's fault."""
    assert is_server_fault(getattr(grpc.StatusCode, code))
    assert is_retryable(getattr(grpc.StatusCode, code))


@pytest.mark.parametrize(
    "code", ["INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"]
)
def test_client_errors_and_backpressure_are_not_faults(code):
    """Client errors and backpressure never count against a server."""
    assert not is_server_fault(getattr(grpc.StatusCode, code))


def test_callers_own_deadline_is_not_a_fault_and_not_retryable():
    """DEADLINE_EXCEEDED after the caller's deadline passed is the caller's, not the server's."""
    assert not is_server_fault(grpc.StatusCode.DEADLINE_EXCEEDED, caller_deadline_passed=True)
    assert not is_retryable(grpc.StatusCode.DEADLINE_EXCEEDED, caller_deadline_passed=True)
    assert is_retryable(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert not is_retryable(grpc.StatusCode.INVALID_ARGUMENT)


# -- circuit breaker --------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_faults_only():
    """Faults interrupted by a success do not open it; `threshold` consecutive ones do."""
    clock = Clock()
    b = CircuitBreaker(failure_threshold=3, open_s=5, clock=clock)
    b.on_fault()
    b.on_fault()
    b.on_success()
    b.on_fault()
    b.on_fault()
    assert b.current() is BreakerState.CLOSED and b.allows()
    b.on_fault()
    assert b.current() is BreakerState.OPEN and not b.allows()
    assert b.open_seconds_left() == pytest.approx(5)


def test_half_open_lets_one_probe_through_and_a_success_closes():
    """After open_s it is half-open: one probe at a time; the probe's success closes it."""
    clock = Clock()
    changes = []
    b = CircuitBreaker(failure_threshold=1, open_s=5, clock=clock, on_change=lambda o, n: changes.append(n))
    b.on_fault()
    clock.now += 4.9
    assert not b.allows()
    clock.now += 0.2
    assert b.allows() and b.current() is BreakerState.HALF_OPEN
    b.on_call()
    assert not b.allows()  # the probe is in flight
    b.on_success()
    assert b.current() is BreakerState.CLOSED and b.allows()
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_failed_probe_reopens_for_longer_up_to_the_cap():
    """A failed probe re-opens the breaker for twice as long, capped at max_open_s."""
    clock = Clock()
    b = CircuitBreaker(failure_threshold=1, open_s=2, max_open_s=5, clock=clock)
    b.on_fault()
    for expected in (4, 5, 5):
        clock.now += 10
        assert b.allows()
        b.on_call()
        b.on_fault()
        assert b.current() is BreakerState.OPEN
        assert b.open_seconds_left() == pytest.approx(expected)
    assert b.opened == 4


def test_neutral_outcome_frees_the_probe_slot():
    """A probe that ends with no verdict (caller gone) lets the next probe through."""
    clock = Clock()
    b = CircuitBreaker(failure_threshold=1, open_s=1, clock=clock)
    b.on_fault()
    clock.now += 2
    b.on_call()
    assert not b.allows()
    b.on_neutral()
    assert b.allows() and b.current() is BreakerState.HALF_OPEN


# -- retry budget -----------------------------------------------------------------------------------


def test_retry_budget_throttles_after_half_the_tokens_and_recovers_with_successes():
    """Retries stop once failures took half the bucket; successes (ratio each) bring them back."""
    budget = RetryBudget(max_tokens=10, token_ratio=0.5)
    for _ in range(4):
        budget.on_failure()
    assert budget.can_retry()  # 6 > 5
    budget.on_failure()
    assert not budget.can_retry()  # 5 is not > 5
    assert budget.throttled == 1
    budget.on_success()
    assert budget.can_retry()
    for _ in range(100):
        budget.on_success()
    assert budget.tokens == 10
    for _ in range(100):
        budget.on_failure()
    assert budget.tokens == 0


def test_trip_opens_at_once_and_a_trip_while_half_open_doubles():
    """trip(): open without failure_threshold faults; tripped again while half-open, out twice as long."""
    from shared.resilience import BreakerState, CircuitBreaker

    now = [0.0]
    b = CircuitBreaker(failure_threshold=3, open_s=1.0, max_open_s=10.0, clock=lambda: now[0])
    b.trip()
    assert b.current() is BreakerState.OPEN and b.open_seconds_left() == 1.0
    now[0] = 1.5
    assert b.current() is BreakerState.HALF_OPEN
    b.trip()
    assert b.current() is BreakerState.OPEN and b.open_seconds_left() == 2.0

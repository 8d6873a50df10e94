"""The next hop gets the caller's time left minus a margin, and nothing when no time is left."""

from __future__ import annotations

import math

import pytest

from shared.deadlines import (
    HOP_MARGIN_S,
    caller_time_left,
    deadline_passed,
    downstream_timeout,
    grpc_timeout_unit,
    wire_timeout,
)
from shared.errors import DeadlineExceeded


class _Ctx:
    def __init__(self, left):
        self.left = left

    def time_remaining(self):
        return self.left


def test_shrinks_by_margin():
    """A caller with 2 s left gives the next hop 2 s minus the margin."""
    assert downstream_timeout(_Ctx(2.0)) == pytest.approx(2.0 - HOP_MARGIN_S)


def test_default_applies_without_caller_deadline():
    """No caller deadline: the default is used."""
    assert downstream_timeout(_Ctx(None), default_s=30.0) == 30.0


def test_default_caps_a_longer_deadline():
    """A default shorter than the caller's deadline wins."""
    assert downstream_timeout(_Ctx(100.0), default_s=10.0) == pytest.approx(10.0 - HOP_MARGIN_S)


def test_expired_raises():
    """With no time left the hop refuses to forward."""
    with pytest.raises(DeadlineExceeded):
        downstream_timeout(_Ctx(0.001))


@pytest.mark.parametrize(
    ("timeout", "unit"), [(0.3, 0.001), (1.0, 0.01), (9.99, 0.01), (20.0, 0.1), (120.0, 1.0), (5000.0, 10.0)]
)
def test_grpc_timeout_unit(timeout, unit):
    """The header's resolution grows with the timeout's magnitude."""
    assert grpc_timeout_unit(timeout) == unit


def test_conservative_time_left_removes_the_headers_rounding_up():
    """A 20 s client deadline arrives as ~20.099 s (rounded up to 100 ms); the conservative view is <= 20 s."""
    assert caller_time_left(_Ctx(20.0995)) <= 20.0
    assert caller_time_left(_Ctx(None)) is None
    assert downstream_timeout(_Ctx(20.0995), conservative=True) == pytest.approx(20.0995 - 0.1 - HOP_MARGIN_S)


@pytest.mark.parametrize("timeout", [0.3, 0.2955, 1.0, 1.97, 19.994, 19.9, 119.995, 3599.0])
def test_wire_timeout_survives_the_headers_rounding_up(timeout):
    """The wire timeout plus gRPC's slop, rounded up to the header's unit, is still at most the timeout."""
    wire = wire_timeout(timeout)
    unit = grpc_timeout_unit(wire)
    assert 0 < wire < timeout
    assert math.ceil((wire + 0.002) / unit - 1e-9) * unit <= timeout + 1e-9
    assert timeout - wire <= grpc_timeout_unit(timeout) + 0.0041


def test_wire_timeout_refuses_a_few_milliseconds():
    """Too little time to be worth a call is a deadline exceeded."""
    with pytest.raises(DeadlineExceeded):
        wire_timeout(0.003)


def test_deadline_passed_tells_expiry_from_no_deadline():
    """time_remaining() is 0 once expired (falsy!) and None without a deadline."""
    assert deadline_passed(_Ctx(0)) and deadline_passed(_Ctx(-0.1))
    assert not deadline_passed(_Ctx(None)) and not deadline_passed(_Ctx(0.5))

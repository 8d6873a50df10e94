"""The next hop gets the caller's time left minus a margin, and nothing when no time is left."""

from __future__ import annotations

import pytest

from shared.deadlines import HOP_MARGIN_S, downstream_timeout
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

"""The arrival rate from the routers' admitted-request counters: summed over routers and versions, a restarted
router's counters taken as a reset (not negative traffic), the first sight of a counter taken as its baseline,
and no rate at all (so the autoscaler falls back to the metrics service) before two polls or once the routers
stopped answering."""

from __future__ import annotations

import pytest

from services.autoscaler.arrivals import ArrivalMeter


def test_rate_sums_routers_and_versions_over_the_window():
    m = ArrivalMeter()
    m.update(0.0, {"a": {("m", "v1"): 1000, ("m", "v2"): 10}, "b": {("m", "v1"): 5}})
    assert m.rate("m", 30) is None  # one poll: counts since each router started, not a rate
    m.update(10.0, {"a": {("m", "v1"): 1900, ("m", "v2"): 110}, "b": {("m", "v1"): 505}})
    assert m.rate("m", 30) == pytest.approx((900 + 100 + 500) / 10)
    assert m.rate("m", 30, "v2") == pytest.approx(10.0)
    assert m.rate("m", 30, "v1") == pytest.approx(140.0)
    assert m.rate("other", 30) == 0.0
    assert m.versions("m") == {"v1", "v2"}


def test_window_takes_the_oldest_poll_inside_it():
    m = ArrivalMeter()
    for i, total in enumerate([0, 100, 200, 1200, 2200]):
        m.update(10.0 * i, {"a": {("m", ""): total}})
    # Polls at 0..40 s; a 20 s window starts at the poll at 20 s: (2200 - 200) / 20.
    assert m.rate("m", 20) == pytest.approx(100.0)
    assert m.rate("m", 40) == pytest.approx(2200 / 40)


def test_a_restarted_router_is_a_reset_not_negative_traffic():
    m = ArrivalMeter()
    m.update(0.0, {"a": {("m", ""): 5000}})
    m.update(10.0, {"a": {("m", ""): 5100}})
    m.update(20.0, {"a": {("m", ""): 40}})  # restarted: 40 since it came back
    assert m.rate("m", 10) == pytest.approx(4.0)
    assert m.rate("m", 30) == pytest.approx((100 + 40) / 20)


def test_a_router_missing_from_a_poll_catches_up_at_the_next():
    m = ArrivalMeter()
    m.update(0.0, {"a": {("m", ""): 0}, "b": {("m", ""): 0}})
    m.update(10.0, {"a": {("m", ""): 100}})  # b did not answer
    m.update(20.0, {"a": {("m", ""): 200}, "b": {("m", ""): 200}})
    assert m.rate("m", 30) == pytest.approx(400 / 20)


def test_no_rate_once_the_routers_stop_answering():
    m = ArrivalMeter()
    m.update(0.0, {"a": {("m", ""): 0}})
    m.update(10.0, {"a": {("m", ""): 100}})
    assert m.rate("m", 30, now=35.0) == pytest.approx(10.0)
    assert m.rate("m", 30, now=41.0) is None

"""The arrival rate from the routers' admitted-request counters: summed over routers and versions, a restarted
router's counters taken whole when its incarnation changed and as a reset (not negative traffic) when it reads
lower, the first sight of a router taken as its baseline and a counter new at a known router counted from zero,
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


def test_a_router_restarted_under_a_new_incarnation_counts_its_whole_new_count():
    """A new process counting past its predecessor's last value before the next poll: all of its count is
    traffic, where comparing counts alone would take 250 - 150 = 100."""
    m = ArrivalMeter()
    m.update(0.0, {"a": {("m", "v1"): 100}}, {"a": "old"})
    m.update(10.0, {"a": {("m", "v1"): 150}}, {"a": "old"})
    m.update(20.0, {"a": {("m", "v1"): 250}}, {"a": "new"})
    assert m.rate("m", 10) == pytest.approx(25.0)
    assert m.rate("m", 20) == pytest.approx((50 + 250) / 20)


def test_a_new_incarnation_restarts_every_counter_of_the_router_and_only_that_router():
    """After a restart the keys the old process had count again from zero when the new one counts them (and
    one only the new process has counted is traffic from zero, not a baseline); another router is untouched."""
    m = ArrivalMeter()
    m.update(0.0, {"a": {("m", "v1"): 40, ("m", "v2"): 7}, "b": {("m", "v1"): 1000}}, {"a": "i1", "b": "j1"})
    m.update(10.0, {"a": {("m", "v3"): 5}, "b": {("m", "v1"): 1010}}, {"a": "i2", "b": "j1"})
    assert m.rate("m", 10, "v3") == pytest.approx(0.5)
    assert m.rate("m", 10, "v1") == pytest.approx(1.0)
    m.update(20.0, {"a": {("m", "v3"): 5, ("m", "v2"): 3}, "b": {("m", "v1"): 1010}}, {"a": "i2", "b": "j1"})
    assert m.rate("m", 10, "v2") == pytest.approx(0.3)  # 3 from zero, not 3 - 7 (nor a reset by luck)
    assert m.rate("m", 10, "v3") == pytest.approx(0.0)


def test_a_router_restarted_while_it_missed_polls_counts_its_new_process_once():
    """A router that did not answer for two polls and came back as a new process: its whole new count, once."""
    m = ArrivalMeter()
    m.update(0.0, {"a": {("m", ""): 500}}, {"a": "i1"})
    m.update(10.0, {}, {})
    m.update(20.0, {}, {})
    m.update(30.0, {"a": {("m", ""): 900}}, {"a": "i2"})
    m.update(40.0, {"a": {("m", ""): 1000}}, {"a": "i2"})
    assert m.rate("m", 40) == pytest.approx(1000 / 40)


def test_an_unchanged_or_unreported_incarnation_keeps_the_lower_count_reset_rule():
    """With the same incarnation, or none reported (a router from before the field), a lower count is still a
    reset (the only restart sign such a router gives); a change from none to one is a new process."""
    m = ArrivalMeter()
    m.update(0.0, {"a": {("m", ""): 5000}}, {"a": ""})
    m.update(10.0, {"a": {("m", ""): 5100}})
    m.update(20.0, {"a": {("m", ""): 40}}, {"a": ""})
    assert m.rate("m", 10) == pytest.approx(4.0)
    m.update(30.0, {"a": {("m", ""): 100}}, {"a": "upgraded"})  # a new process: 100 from zero, not 100 - 40
    assert m.rate("m", 10) == pytest.approx(10.0)
    m.update(40.0, {"a": {("m", ""): 150}}, {"a": "upgraded"})
    assert m.rate("m", 10) == pytest.approx(5.0)


def test_a_counter_new_at_a_router_already_polled_counts_from_zero():
    """A router's first request for a model (or version) after the meter first saw that router: the counter did
    not exist at the last poll, so all of it is traffic; a router seen for the first time is still a baseline."""
    m = ArrivalMeter()
    m.update(0.0, {"a": {}}, {"a": "i1"})
    m.update(10.0, {"a": {("m", "v1"): 5}, "b": {("m", "v1"): 900}}, {"a": "i1", "b": "j1"})
    assert m.total("m") == 5
    assert m.rate("m", 10) == pytest.approx(0.5)

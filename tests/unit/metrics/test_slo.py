"""SLO objects and multi-window, multi-burn-rate alerts on a virtual clock: a 2% error rate against a 99.9%
SLO pages within the 5-minute short window and stops after recovery; 0.05% never fires."""

from __future__ import annotations

import pytest
from fleetserve.metrics.v1 import metrics_service_pb2 as mpb
from hypothesis import given, settings
from hypothesis import strategies as st

from services.metrics.records import RequestRecord
from services.metrics.slo import (
    DEFAULT_RULES,
    EventRing,
    SloConfig,
    SloEngine,
    SloSpec,
    burn_rate,
    load_slo_config,
)

AVAILABILITY = SloSpec("availability", "availability", 0.999)


class Traffic:
    """Requests at a steady rate on a virtual clock, every Nth one failing (UNAVAILABLE)."""

    def __init__(self, engine: SloEngine, clock: list[float], rate_per_s: float = 10.0) -> None:
        self.engine, self.clock, self.rate = engine, clock, rate_per_s
        self.sent = 0
        self.changes: list[tuple[float, mpb.Alert]] = []

    def run(self, seconds: float, fail_every: int = 0, eval_every_s: float = 10.0, ttft_ms: float = 50.0):
        """Send for `seconds`, evaluating the rules every eval_every_s; the alerts that changed on the way."""
        end = self.clock[0] + seconds
        next_eval = self.clock[0] + eval_every_s
        while self.clock[0] < end:
            self.clock[0] += 1.0 / self.rate
            self.sent += 1
            failed = bool(fail_every) and self.sent % fail_every == 0
            self.engine.add(
                RequestRecord(
                    self.clock[0], 100.0, ttft_ms, 10, 14 if failed else 0, model="m", tier="standard"
                )
            )
            if self.clock[0] >= next_eval:
                next_eval += eval_every_s
                self.changes += [(self.clock[0], a) for a in self.engine.evaluate()]
        return self.changes


def engine_with(clock, slos=(AVAILABILITY,), **kw) -> SloEngine:
    return SloEngine(SloConfig(slos=slos, **kw), clock=lambda: clock[0])


def firing_ids(engine: SloEngine) -> set[str]:
    return {a.alert_id for a in engine.firing()}


def test_two_percent_errors_page_within_five_minutes_and_clear_after_recovery():
    """2% errors (burn rate 20) fire the 14.4x 1h/5m page within 5 minutes; after recovery the short window
    drops under 14.4x within minutes and the page resolves, while the slower rules may still burn."""
    clock = [1_000_000.0]
    engine = engine_with(clock)
    traffic = Traffic(engine, clock)
    start = clock[0]
    traffic.run(300, fail_every=50)
    fired = [(t, a) for t, a in traffic.changes if a.rule == "fast-1h" and a.state == mpb.ALERT_STATE_FIRING]
    assert fired, "fast burn must page within the 5-minute short window"
    t_fired, alert = fired[0]
    assert t_fired - start <= 300
    assert alert.alert_id == "m-availability/fast-1h"
    assert alert.severity == mpb.ALERT_SEVERITY_PAGE
    assert alert.long_burn_rate >= 14.4 and alert.short_burn_rate >= 14.4
    assert alert.long_window_s == 3600 and alert.short_window_s == 300
    assert "m-availability/fast-1h" in firing_ids(engine)

    recovered_at = clock[0]
    traffic.run(600)
    resolved = [t for t, a in traffic.changes if a.rule == "fast-1h" and a.state == mpb.ALERT_STATE_RESOLVED]
    assert resolved and resolved[0] - recovered_at <= 300, "the 5-minute short window ends the page"
    assert "m-availability/fast-1h" not in firing_ids(engine)


def test_half_a_budget_rate_never_fires():
    """0.05% errors burn at 0.5x: no rule fires, over hours of traffic."""
    clock = [1_000_000.0]
    engine = engine_with(clock)
    changes = Traffic(engine, clock, rate_per_s=4.0).run(3 * 3600, fail_every=2000, eval_every_s=60)
    assert changes == []
    (status,) = engine.status()
    assert status.sli == pytest.approx(0.9995, abs=5e-5)
    assert status.error_budget_remaining == pytest.approx(0.5, abs=0.05)


def test_clean_history_delays_the_long_window_as_the_workbook_says():
    """After an hour of clean traffic, burn 20 needs 14.4/20 of the 1 h window (~43 min) to page: the long
    window guards against short blips."""
    clock = [1_000_000.0]
    engine = engine_with(clock)
    traffic = Traffic(engine, clock, rate_per_s=4.0)
    traffic.run(3600)
    start = clock[0]
    traffic.run(3600, fail_every=50, eval_every_s=30)
    t_fired = next(t for t, a in traffic.changes if a.rule == "fast-1h" and a.state == mpb.ALERT_STATE_FIRING)
    assert 0.6 * 3600 <= t_fired - start <= 0.8 * 3600


def test_time_compression_shrinks_every_window():
    """With time_scale 60 the 1 h / 5 min rule becomes 60 s / 5 s, and fires within 5 compressed seconds."""
    clock = [1_000_000.0]
    engine = engine_with(clock, time_scale=60.0)
    traffic = Traffic(engine, clock, rate_per_s=100.0)
    start = clock[0]
    traffic.run(5, fail_every=50, eval_every_s=0.25)
    fired = [t for t, a in traffic.changes if a.rule == "fast-1h" and a.state == mpb.ALERT_STATE_FIRING]
    assert fired and fired[0] - start <= 5
    assert engine.firing()[0].short_window_s == 5.0


def test_latency_slo_counts_slow_requests_as_bad():
    """TTFT p99 < 100 ms: every request over 100 ms is a bad event; requests without a first token are none."""
    clock = [0.0]
    spec = SloSpec("ttft", "ttft", 0.99, threshold_ms=100.0)
    engine = engine_with(clock, slos=(spec,))
    for i in range(100):
        clock[0] += 1
        engine.add(RequestRecord(clock[0], 500.0, 150.0 if i % 10 == 0 else 50.0, 10, 0, model="m"))
    engine.add(RequestRecord(clock[0], 5.0, None, 0, 14, model="m"))
    (status,) = engine.status()
    assert (status.events, status.bad_events) == (100, 10)
    assert status.burn_rates[0].burn_rate == pytest.approx(10.0)  # 10% slow against 1% allowed
    assert status.slo.kind == mpb.SLO_KIND_TTFT


def test_tier_and_model_patterns():
    """ "*" makes one SLO object per model; a tier SLO counts only that tier's requests."""
    clock = [0.0]
    specs = (
        SloSpec("avail", "availability", 0.99),
        SloSpec("{model}-batch", "availability", 0.9, tier="batch"),
    )
    engine = engine_with(clock, slos=specs)
    engine.add(RequestRecord(0.0, 1.0, None, 0, 14, model="a", tier="batch"))
    engine.add(RequestRecord(0.0, 1.0, None, 0, 0, model="a", tier="interactive"))
    engine.add(RequestRecord(0.0, 1.0, None, 0, 0, model="b", tier="interactive"))
    by_name = {s.slo.name: s for s in engine.status()}
    assert set(by_name) == {"a-avail", "a-batch", "b-avail", "b-batch"}
    assert (by_name["a-avail"].events, by_name["a-batch"].events) == (2, 1)
    assert by_name["b-batch"].events == 0


def test_min_events_keeps_a_trickle_from_paging():
    """Two failures out of three requests burn at 667x but are too few events to page on."""
    clock = [0.0]
    engine = engine_with(clock, min_events=10)
    for code in (14, 14, 0):
        clock[0] += 1
        engine.add(RequestRecord(clock[0], 1.0, None, 0, code, model="m"))
    assert engine.evaluate() == []


def test_listeners_get_changes():
    """WatchAlerts listeners receive exactly the alerts that changed."""
    clock = [0.0]
    engine = engine_with(clock, min_events=0)
    got: list[list[mpb.Alert]] = []
    engine.listeners.append(got.append)
    engine.add(RequestRecord(1.0, 1.0, None, 0, 14, model="m"))
    engine.evaluate()
    assert [a.rule for a in got[0]] == [r.name for r in DEFAULT_RULES]
    assert engine.evaluate() == [] and len(got) == 1


def test_event_ring_windows_and_wraparound():
    """Sums cover the buckets overlapping the window; slots reused after wrap-around start from zero."""
    ring = EventRing(1.0, 10.0)
    for t in range(30):
        ring.add(t + 0.5, bad=t % 2 == 0)
    assert ring.sums(5.0, 29.9) == (5, 2)
    assert ring.sums(100.0, 29.9)[0] <= ring.n
    ring.add(0.5, bad=True)  # older than the ring reaches: ignored
    assert ring.sums(5.0, 29.9) == (5, 2)


def test_burn_rate():
    """(bad / events) / (1 - objective); 0 without events."""
    assert burn_rate(1000, 20, 0.999) == pytest.approx(20.0)
    assert burn_rate(0, 0, 0.999) == 0.0


def test_slo_file(tmp_path):
    """An SLO file sets objectives and rules; bad values fail loudly naming the file."""
    path = tmp_path / "slos.toml"
    path.write_text(
        '[[slo]]\nname = "chat-ttft"\nkind = "ttft"\nobjective = 0.99\nthreshold_ms = 300\nmodel = "m"\n'
        'tier = "interactive"\nperiod_days = 7\n'
        '[[rule]]\nname = "fast"\nburn_rate = 10\nlong_window_s = 600\nshort_window_s = 60\n'
    )
    cfg = load_slo_config(str(path), time_scale=2.0)
    assert cfg.slos == (SloSpec("chat-ttft", "ttft", 0.99, "m", "interactive", 300.0, 7 * 86400.0),)
    assert [r.name for r in cfg.rules] == ["fast"] and cfg.scaled(600) == 300
    path.write_text('[[slo]]\nname = "x"\nkind = "ttft"\nobjective = 0.99\n')
    with pytest.raises(ValueError, match="threshold_ms"):
        load_slo_config(str(path))
    path.write_text('[[slo]]\nname = "x"\nkind = "availability"\nobjective = 99.9\n')
    with pytest.raises(ValueError, match="objective"):
        load_slo_config(str(path))
    with pytest.raises(ValueError, match="nope.toml"):
        load_slo_config(str(tmp_path / "nope.toml"))


def test_availability_counts_only_requests_the_fleet_had_to_serve():
    """Client errors, cancellations and rate limits are no events of the availability SLO; fleet errors are bad
    events and OK requests good ones (the same SLI as the Prometheus rules)."""
    clock = [0.0]
    engine = engine_with(clock)
    for code in (0, 0, 14, 3, 16, 1, 8, 5):
        engine.add(RequestRecord(1.0, 1.0, None, 0, code, model="m"))
    (status,) = engine.status()
    assert (status.events, status.bad_events) == (3, 1)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 200), st.booleans()), max_size=60),
    st.floats(1, 150),
    st.floats(100, 220),
)
def test_event_ring_sums_match_counting(events, window_s, now):
    """For any events, a window's sums are the events of the buckets it overlaps that the ring still holds."""
    ring = EventRing(1.0, 50.0)
    for t, bad in events:
        ring.add(t, bad)
    got = ring.sums(window_s, now)
    last, first = int(now // 1.0), int((now - window_s) // 1.0) + 1
    lo = max(first, last - ring.n + 1)
    newest = {}
    for t, _ in events:  # a slot keeps the newest bucket mapped to it
        i = int(t // 1.0)
        newest[i % ring.n] = max(newest.get(i % ring.n, -1), i)
    kept = [(t, bad) for t, bad in events if newest[int(t // 1.0) % ring.n] == int(t // 1.0)]
    inside = [(t, bad) for t, bad in kept if lo <= int(t // 1.0) <= last]
    assert got == (len(inside), sum(b for _, b in inside))

"""Scaling policies and the decider on a virtual clock: hysteresis, cooldowns, min/max, scale to zero and wake,
Little's-law capacity, time-zone-aware schedules, and the predictive policy's lead time from measured cold
starts."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from services.autoscaler.decider import Decider
from services.autoscaler.policies import build
from services.autoscaler.signals import ModelSignals
from services.autoscaler.spec import parse_model, parse_models


def sig(now: float = 0.0, **kw) -> ModelSignals:
    return ModelSignals(now=now, serving=kw.pop("serving", 2), **kw)


def reactive(**opts):
    return build("reactive", opts, replica_rps=0, default_cold_start_s=60)


def test_reactive_holds_within_tolerance_and_scales_in_proportion_outside():
    """Running per replica within 10% of the target changes nothing; 2x the target doubles the replicas; an
    empty queue never asks for fewer replicas than utilisation does."""
    p = reactive(target_running_per_replica=10, tolerance=0.1)
    assert p.desire(sig(serving=4, running=42)).replicas == 4  # 1.05x: inside the band
    d = p.desire(sig(serving=4, running=80))
    assert d.replicas == 8 and d.signal == "running_per_replica"
    assert p.desire(sig(serving=4, running=32, waiting=0)).replicas == 4  # 0.8x -> ceil(3.2)
    assert p.desire(sig(serving=4, running=20)).replicas == 2
    queued = p.desire(sig(serving=2, running=20, waiting=24))  # 24 waiting / 2 / 4 = 3x
    assert queued.replicas == 6 and queued.signal == "waiting_per_replica"


def test_reactive_ttft_only_adds_replicas():
    """TTFT p99 above its objective adds replicas in proportion; below it, it is ignored."""
    p = reactive(
        target_running_per_replica=0, target_waiting_per_replica=0, target_kv_usage=0, ttft_slo_ms=500
    )
    assert p.desire(sig(serving=3, ttft_p99_ms=1000)).replicas == 6
    assert p.desire(sig(serving=3, ttft_p99_ms=100)).replicas is None


def test_capacity_follows_littles_law():
    """Arrival rate / per-replica rate x headroom, the per-replica rate from concurrency / E2E time when not
    given, plus a backlog drained within drain_s."""
    p = build(
        "capacity", {"headroom": 0.0, "replica_concurrency": 40}, replica_rps=0, default_cold_start_s=60
    )
    # 40 in flight per replica at a 2 s E2E time: 20 req/s per replica; 100 req/s -> 5.
    assert p.desire(sig(arrival_rate=100, mean_e2e_s=2.0)).replicas == 5
    q = build("capacity", {"headroom": 0.1, "drain_s": 10}, replica_rps=20, default_cold_start_s=60)
    d = q.desire(sig(arrival_rate=100, queued=200))
    # 100 x 1.1 / 20 = 5.5, + 200 / (20 x 10) = 1 -> 6.5 -> 7
    assert d.replicas == 7 and d.numbers["backlog"] == 200


def test_scheduled_window_is_time_zone_aware():
    """A weekday 09:00-10:00 Paris window is open at 09:30 Paris time (08:30 UTC in winter) and closed at
    09:30 UTC."""
    p = build(
        "scheduled",
        {"windows": [{"cron": "0 9 * * 1-5", "duration_s": 3600, "min_replicas": 6, "tz": "Europe/Paris"}]},
        replica_rps=0,
        default_cold_start_s=60,
    )
    inside = datetime(2026, 12, 2, 9, 30, tzinfo=ZoneInfo("Europe/Paris")).timestamp()
    outside = datetime(2026, 12, 2, 9, 30, tzinfo=ZoneInfo("UTC")).timestamp()
    assert p.desire(sig(now=0, wall_unix=inside)).replicas == 6
    assert p.desire(sig(now=0, wall_unix=outside)).replicas is None


def test_predictive_starts_replicas_one_measured_cold_start_ahead():
    """After a season with a spike at t0, the forecast asks for the spike's replicas once t0 is within the
    lead time, which is the longest measured cold start plus the margin (not a constant)."""
    period, t0 = 3600.0, 1800.0
    opts = {"period_s": period, "bucket_s": 10, "trend_window_s": 300, "lead_margin_s": 10, "headroom": 0}
    p = build("predictive", opts, replica_rps=10, default_cold_start_s=60)
    for t in range(0, int(period), 5):
        p.observe(float(t), 100.0 if t0 <= t < t0 + 600 else 20.0)
    now = period + t0 - 120  # the spike is 120 s away
    for t in range(int(period), int(now), 5):
        p.observe(float(t), 20.0)
    short = p.desire(sig(now=now, arrival_rate=20, cold_starts_s=(60.0,)))  # lead 70 s: not yet
    long = p.desire(sig(now=now, arrival_rate=20, cold_starts_s=(50.0, 130.0)))  # lead 140 s: now
    assert short.replicas == 2
    assert long.replicas == 10 and long.numbers["lead_s"] == 140.0
    assert long.signal == "forecast_seasonal"


def test_predictive_extrapolates_a_trend_before_a_full_season():
    """With less than a season of history, a rising rate is extrapolated over the lead time."""
    p = build(
        "predictive",
        {"bucket_s": 10, "headroom": 0, "lead_margin_s": 0},
        replica_rps=10,
        default_cold_start_s=60,
    )
    for t in range(0, 600, 10):
        p.observe(float(t), float(t) / 10)  # +1 req/s every 10 s
    d = p.desire(sig(now=600.0, arrival_rate=60))
    assert d.signal == "forecast_trend" and d.replicas == 7  # ~66 req/s in 60 s


def _season_with_a_spike(p, period: float, t0: float, until: float, dip: tuple[float, float] | None = None):
    """A season of 20 req/s with 100 req/s over [t0, t0 + 600) (and 20 again over `dip` inside it), then today's
    samples the same up to `until`."""
    for t in range(0, int(until), 5):
        tod = t % period
        spiking = t0 <= tod < t0 + 600 and not (dip and dip[0] <= tod < dip[1])
        p.observe(float(t), 100.0 if spiking else 20.0)


def _predictive_decider(cooldown_s: float = 300, **opts):
    raw = {
        "policies": {
            "predictive": {
                "period_s": 3600,
                "bucket_s": 10,
                "trend_window_s": 300,
                "lead_margin_s": 10,
                "headroom": 0,
                **opts,
            }
        },
        "replica_rps": 10,
        "cold_start_s": 60,
        "max_replicas": 20,
        "scale_down_cooldown_s": cooldown_s,
    }
    return Decider(parse_model("m", raw), initial=2)


def test_forecast_aware_scale_down_lets_a_gone_peak_go_after_the_short_hold():
    """Yesterday's spike ended at t0 + 600: today the forecast, looking ahead, says the load is gone, so the
    spike's replicas go scale_down_hold_s (60 s) after the last ask for them, not after the 300 s cooldown;
    the decision says the forecast backed it."""
    period, t0 = 3600.0, 1800.0
    d = _predictive_decider()
    _season_with_a_spike(d.policies[0], period, t0, period + t0 - 60)
    now = period + t0 - 60
    assert d.decide(sig(now=now, serving=2, arrival_rate=20)).desired == 10  # one lead ahead of the spike
    t = int(now)
    for t in range(int(now) + 10, int(period + t0 + 600), 10):  # through the spike
        rate = 100.0 if t >= period + t0 else 20.0
        d.policies[0].observe(float(t), rate)
        assert d.decide(sig(now=float(t), serving=d.desired, arrival_rate=rate)).desired >= 10
    downs = []
    end = t
    for t in range(end + 10, end + 400, 10):  # after it
        d.policies[0].observe(float(t), 20.0)
        dec = d.decide(sig(now=float(t), serving=d.desired, arrival_rate=20))
        if dec.direction == "down":
            downs.append((t - (period + t0 + 600), dec.desired, dec.reason))
    # 60 s hold + one decision; 20 req/s is 2 replicas, 3 with the 10% hysteresis below the current count.
    assert downs and downs[0][1] == 3 and downs[0][0] <= 70, downs
    assert "predictive-backed" in downs[0][2]


def test_forecast_aware_scale_down_keeps_replicas_needed_again_within_keep_ahead():
    """A 100 s dip inside yesterday's spike: the forecast needs the replicas again within keep_ahead_s, so it
    keeps them through the dip (no stop-and-restart, no flap)."""
    period, t0 = 3600.0, 1800.0
    d = _predictive_decider()
    dip = (t0 + 200, t0 + 300)
    _season_with_a_spike(d.policies[0], period, t0, period + t0 + 200, dip=dip)
    for t in range(int(period + dip[0]), int(period + dip[1]), 10):
        d.policies[0].observe(float(t), 20.0)
        assert d.decide(sig(now=float(t), serving=10, arrival_rate=20)).desired == 10


def test_a_gradual_decline_keeps_the_plain_hold():
    """The short hold is for a load that is gone: a forecast that asks for one replica fewer of ten (below
    gone_fraction) does not vouch, and the decider waits its plain scale-down window; the same forecast from
    twenty replicas (a gone load) vouches, and the decider lets them go after the short hold."""
    p = build(
        "predictive",
        {"period_s": 3600, "bucket_s": 10, "headroom": 0},
        replica_rps=10,
        default_cold_start_s=60,
    )
    for t in range(0, 3600, 5):
        p.observe(float(t), 80.0)
    d = p.desire(sig(now=3600.0, serving=10, arrival_rate=80))
    assert d.replicas == 9 and d.down_hold_s is None  # 10% fewer: a decline, not a gone load
    gone = p.desire(sig(now=3600.0, serving=20, arrival_rate=80))
    assert gone.replicas == 9 and gone.down_hold_s == 60.0

    def first_down(initial: int) -> float:
        """When a decider at `initial` that just asked for it (a 100 req/s moment) goes down at 80 req/s."""
        dec = _predictive_decider(cooldown_s=300)
        dec.desired = initial
        for t in range(0, 3600, 5):
            dec.policies[0].observe(float(t), 80.0)
        dec.decide(sig(now=3600.0, serving=initial, arrival_rate=10.0 * initial))
        for t in range(3610, 4000, 10):
            if dec.decide(sig(now=float(t), serving=initial, arrival_rate=80)).direction == "down":
                return t - 3600.0
        raise AssertionError("never went down")

    assert 300 <= first_down(10) <= 310  # the plain window (+ one decision)
    assert first_down(20) <= 70  # 60 s of agreement (+ one decision)


def test_replicas_a_reactive_alarm_added_keep_the_plain_hold():
    """A TTFT alarm raised the count past the forecast (the forecast missed something): for the plain window
    after it the forecast does not vouch, even for a drop that looks like a gone load."""
    raw = {
        "policies": {
            "predictive": {"period_s": 3600, "bucket_s": 10, "headroom": 0},
            "reactive": {"target_running_per_replica": 0, "target_kv_usage": 0, "ttft_slo_ms": 500},
        },
        "replica_rps": 10,
        "max_replicas": 30,
    }
    dec = Decider(parse_model("m", raw), initial=9)
    for t in range(0, 3600, 5):
        dec.observe(float(t), 80.0)
    up = dec.decide(sig(now=3600.0, serving=9, arrival_rate=80, ttft_p99_ms=1500))
    assert (up.desired, up.policy) == (27, "reactive")
    for t in range(3610, 3900, 10):  # the alarm is over; the forecast asks 9 (a gone load's drop): held
        assert dec.decide(sig(now=float(t), serving=27, arrival_rate=80)).desired == 27
    assert dec.decide(sig(now=3910.0, serving=27, arrival_rate=80)).desired == 9


def spec(**kw):
    return parse_model("m", {"policies": {"reactive": {"target_running_per_replica": 10}}, **kw})


def test_decider_clamps_to_min_and_max_and_holds_scale_down_for_the_cooldown():
    """Asks are clamped to [min, max]; scale-up is immediate; scale-down waits for the cooldown and goes only
    as low as the highest ask over that window."""
    d = Decider(spec(min_replicas=2, max_replicas=6, scale_down_cooldown_s=100), initial=2)
    assert d.decide(sig(now=0, serving=2, running=200)).desired == 6  # asks 20, max 6
    assert d.decide(sig(now=10, serving=6, running=0)).desired == 6  # wants 2, held
    assert d.decide(sig(now=60, serving=6, running=30)).desired == 6  # asks 3
    dec = d.decide(sig(now=105, serving=6, running=0))
    assert (dec.desired, dec.direction) == (3, "down")  # the highest ask of the last 100 s was 3
    assert d.decide(sig(now=300, serving=3, running=0)).desired == 2  # min


def test_decider_scale_up_cooldown_and_step_limit():
    """A second scale-up waits for the scale-up cooldown; max_step_up bounds each step."""
    d = Decider(spec(max_replicas=20, scale_up_cooldown_s=30, max_step_up=2), initial=1)
    assert d.decide(sig(now=0, serving=1, running=100)).desired == 3
    assert d.decide(sig(now=10, serving=3, running=100)).desired == 3
    assert d.decide(sig(now=31, serving=3, running=100)).desired == 5


def test_decider_never_flaps_on_noise_around_the_target():
    """A steady load whose running count wanders +-15% around 5 replicas' target, for an hour of 10 s
    decisions: at most one change (up), never back and forth."""
    import random

    rng = random.Random(1)
    d = Decider(spec(max_replicas=20, scale_down_cooldown_s=300), initial=5)
    directions = []
    for i in range(360):
        dec = d.decide(sig(now=i * 10.0, serving=d.desired, running=int(50 * rng.uniform(0.85, 1.15))))
        if dec.direction != "hold":
            directions.append(dec.direction)
    assert directions in ([], ["up"])


def test_scale_to_zero_after_idle_and_wake_on_a_waiting_request():
    """With scale_to_zero, the last replica goes once idle_s without demand has passed and the scale-down
    window agrees; a queued request at zero wakes one at once."""
    d = Decider(spec(min_replicas=0, scale_to_zero=True, idle_s=60, scale_down_cooldown_s=30), initial=1)
    assert d.decide(sig(now=0, serving=1)).desired == 1
    assert d.decide(sig(now=50, serving=1)).desired == 1
    assert d.decide(sig(now=61, serving=1)).desired == 1  # idle, but the last 30 s asked for 1
    dec = d.decide(sig(now=95, serving=1))
    assert (dec.desired, dec.policy) == (0, "scale_to_zero")
    wake = d.decide(sig(now=96, serving=0, queued=1))
    assert (wake.desired, wake.policy, wake.direction) == (1, "wake", "up")


def test_a_model_that_starts_at_zero_starts_nothing_until_a_request_comes():
    """An autoscaler that starts with a scale-to-zero model at zero keeps it there while nothing asks for it
    (no replica at boot only to be stopped idle_s later), and wakes it for the first request."""
    d = Decider(spec(min_replicas=0, scale_to_zero=True, idle_s=60), initial=0)
    for t in (0, 10, 20):
        assert d.decide(sig(now=t, serving=0)).desired == 0
    assert d.decide(sig(now=30, serving=0, queued=1)).policy == "wake"


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"min_replicas": 5, "max_replicas": 2}, "models.m.min_replicas"),
        ({"policies": {"magic": {}}}, "models.m.policies"),
        ({"scale_down_cooldown_s": -1}, "models.m.scale_down_cooldown_s"),
        ({"policies": {"reactive": {"tolerance": -0.1}}}, "models.m.policies.reactive.tolerance"),
        ({"policies": {"reactive": {"bogus": 1}}}, "models.m.policies.reactive"),
        (
            {
                "policies": {
                    "scheduled": {"windows": [{"cron": "every day", "duration_s": 60, "min_replicas": 2}]}
                }
            },
            "models.m.policies.scheduled.windows[0].cron",
        ),
        (
            {
                "policies": {
                    "scheduled": {
                        "windows": [
                            {"cron": "0 9 * * *", "duration_s": 60, "min_replicas": 2, "tz": "Mars/Base"}
                        ]
                    }
                }
            },
            "models.m.policies.scheduled.windows[0].tz",
        ),
        ({"policies": ["capacity"]}, "models.m.policies.capacity"),
        ({"min_replicas": 0}, "models.m.min_replicas"),
        ({"scale_to_zero": True}, "models.m.scale_to_zero"),
        ({"max_replicas": 2.5}, "models.m.max_replicas"),
    ],
)
def test_bad_configuration_is_refused_naming_the_field(raw, field):
    """Every bad value fails parsing with a message that starts with the field's path."""
    with pytest.raises(ValueError) as exc:
        parse_model("m", raw)
    assert str(exc.value).startswith(field), str(exc.value)


def test_models_parse_from_json_text_and_file(tmp_path):
    """--models takes JSON or a .json file; an empty or non-object value is refused."""
    text = '{"a": {"max_replicas": 3}, "b": {"policies": ["reactive"]}}'
    assert [s.model for s in parse_models(text)] == ["a", "b"]
    f = tmp_path / "m.json"
    f.write_text(text)
    assert parse_models(str(f))[0].max_replicas == 3
    for bad in ("", "[]", "{", "x.json"):
        with pytest.raises(ValueError, match="^models"):
            parse_models(bad)

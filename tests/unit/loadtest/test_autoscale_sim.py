"""The autoscaling bench's fleet model and oracle, on small inputs: a cold start delays capacity (requests are
late meanwhile), the oracle's plan starts replicas one cold start ahead and bridges short gaps, flaps are
direction reversals within the window, and a user's CSV trace becomes a per-second rate."""

from __future__ import annotations

import numpy as np
import pytest

from loadtest.autoscale_bench import trace, trace_from_csv
from loadtest.autoscale_model import Point, ReplicaModel, Slo, Workload
from loadtest.autoscale_sim import flaps, needed, oracle_plan, simulate


def model(rps: float = 10.0) -> ReplicaModel:
    """A replica that meets the SLO up to 10 req/s and saturates at 12 (a measured curve's shape)."""
    pts = [
        Point(1, 1, 1.0, 20, 30, 5, 0.5, 0.5),
        Point(rps, rps, 0.999, 40, 200, 8, 0.8, rps * 0.8),
        Point(12, 12, 0.2, 400, 2000, 20, 3.0, 36),
    ]
    return ReplicaModel("test", Workload(), Slo(), pts, rps_at_slo=rps, rps_max=12.0, target=0.999)


def test_a_new_replica_serves_only_after_its_cold_start():
    """Load doubles at t=100; a policy that asks for 2 replicas at once gets the second one 30 s later, and the
    requests beyond one replica's saturation are late until then and until their backlog is served."""
    rates = np.where(np.arange(300) < 100, 8.0, 16.0)
    arrivals = np.round(rates).astype(int)

    def decide(t, s):
        return 2 if t >= 100 else 1

    tl = simulate(
        rates, model(), decide, cold_start_s=30, initial=1, decision_interval_s=10, arrivals=arrivals
    )
    assert tl.serving[105] == 1 and tl.serving[135] == 2
    assert (
        tl.late[100:130].sum() > 100
    )  # 4 req/s beyond one replica's 12 for 30 s, and what queued behind them
    # Once the backlog is served, only the curve's own misses remain (0.1% at the SLO rate).
    assert tl.late[180:].max() < 0.05 and tl.ok[180:].sum() > 0.99 * arrivals[180:].sum()
    assert tl.replicas[105] == 2  # the booting replica is paid for
    assert tl.events == [(100, 1, 2, "")]


def test_oracle_plans_one_cold_start_ahead_and_bridges_short_gaps():
    """Replica 2 is needed on [50, 60) and [70, 80) and [200, 210): started 20 s ahead, kept through the 10 s
    gap (shorter than a cold start), stopped through the long one."""
    need = np.ones(300, dtype=np.int32)
    need[50:60] = need[70:80] = need[200:210] = 2
    plan = oracle_plan(need, cold_start_s=20)
    assert plan[29] == 1 and plan[30] == 2 and plan[65] == 2 and plan[79] == 2 and plan[80] == 1
    assert plan[179] == 1 and plan[180] == 2 and plan[210] == 1


def test_needed_leaves_a_poisson_margin():
    """ceil((rate + 3 sqrt(rate)) / rps), at least one."""
    assert list(needed(np.array([0.0, 9.0, 100.0]), 10.0)) == [1, 2, 13]


def test_flaps_are_reversals_within_the_window():
    events = [(0, 1, 2, ""), (100, 2, 1, ""), (1000, 1, 2, ""), (1100, 2, 3, "")]
    assert flaps(events, window_s=600) == 1


def test_csv_trace_spreads_each_interval_evenly(tmp_path):
    """Rows of (timestamp, requests in the interval up to the next row) become a per-second rate; a header is
    skipped; a malformed row is refused with its line number."""
    f = tmp_path / "t.csv"
    f.write_text("timestamp,requests\n1000,60\n1060,120\n1120,0\n")
    rate = trace_from_csv(str(f))
    assert len(rate) == 121 and rate[0] == 1.0 and rate[60] == 2.0
    bad = tmp_path / "bad.csv"
    bad.write_text("0,1\n5,x\n")
    with pytest.raises(ValueError, match="line 2"):
        trace_from_csv(str(bad))


def test_spike_trace_is_5x_within_a_minute_for_ten_minutes():
    r = trace("spike", 100.0, days=1, seed=0)
    base, peak = np.median(r[: 13 * 3600]), np.median(r[14 * 3600 + 120 : 14 * 3600 + 540])
    assert 4.5 < peak / base < 5.5
    assert np.median(r[14 * 3600 + 700 : 15 * 3600]) < 1.2 * base

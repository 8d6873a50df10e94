"""The dashboard's data: series on the latency buckets' grid (percentiles and mean, throughput, errors, cost per
1k tokens, replicas up and desired, KV use per replica), alerts and the slowest requests."""

from __future__ import annotations

import pytest
from fleetserve.metrics.v1 import metrics_service_pb2 as mpb

from services.metrics.cost import PriceBook
from services.metrics.dashboard.api import Dashboard, trace_document
from services.metrics.gauges import GaugeHistory, ReplicaClock
from services.metrics.latency import RequestStats
from services.metrics.records import RequestRecord
from services.metrics.slo import SloConfig, SloEngine


def board(now: float) -> Dashboard:
    clock = lambda: now  # noqa: E731
    replicas = ReplicaClock()
    for t in (now - 100, now):
        replicas.on_uptime(
            {"replica_id": "e1", "replica_type": "h100-llama-1b", "model": "m"}, t, t - (now - 120)
        )
    kv, desired = GaugeHistory("replica_id"), GaugeHistory("model", "fleetserve.model")
    kv.on_point({"replica_id": "e1"}, now - 25, 0.25)
    kv.on_point({"replica_id": "e1"}, now - 5, 0.5)
    desired.on_point({"fleetserve.model": "m"}, now - 30, 2.0)  # as the autoscaler exports it
    stats = RequestStats(clock=clock)
    for i in range(20):
        stats.add(
            RequestRecord(
                now - 30 + i,
                100.0 + i,
                10.0 + i,
                11,
                14 if i == 3 else 0,
                model="m",
                prompt_tokens=9,
                trace_id=f"{i:032x}",
                request_id=f"r{i}",
            )
        )
    return Dashboard(stats, SloEngine(SloConfig(), clock=clock), replicas, PriceBook(), kv, desired)


def test_document_series_share_one_grid():
    """Every series has one value per 10 s bucket; latency has p50/p95/p99 and the mean; replicas up come from
    the uptime gauge, desired from the autoscaler's gauge; KV use is the last point at each bucket's end."""
    now = 1_000_000.0
    d = board(now).document(60.0, now)
    n = len(d["t"])
    assert n == 2  # requests ended 30 .. 11 s ago: two 10 s buckets
    for key in ("requests_per_s", "output_tokens_per_s", "error_rate", "cost_per_1k_tokens", "slow_ttft"):
        assert len(d[key]) == n, key
    assert set(d["ttft_ms"]) == {"p50", "p95", "p99", "mean"} and all(
        len(v) == n for v in d["ttft_ms"].values()
    )
    assert sum(r * 10 for r in d["requests_per_s"]) == pytest.approx(20)
    assert max(d["error_rate"]) == pytest.approx(0.1)
    assert d["replicas"]["actual"] == [1, 1] and d["replicas"]["has_desired"]
    assert d["replicas"]["desired"][-1] == 2.0
    assert d["kv_cache_usage"]["e1"] == [0.25, 0.25], "the point 5 s ago is after the last bucket ends"
    assert all(c is not None and c > 0 for c in d["cost_per_1k_tokens"])
    assert d["slowest"][0]["e2e_ms"] == pytest.approx(119.0) and d["slowest"][0]["request_id"] == "r19"
    assert d["alerts"] == {"firing": [], "recent": []}


def test_alerts_are_listed():
    """Alerts reported to the dashboard's listener show as recent changes."""
    b = board(1_000_000.0)
    b.on_alerts([mpb.Alert(alert_id="m-availability/fast-1h", state=mpb.ALERT_STATE_FIRING)])
    assert b.document(60.0, 1_000_000.0)["alerts"]["recent"][0]["alert_id"] == "m-availability/fast-1h"


def test_trace_document_offsets_from_the_trace_start():
    """Spans come back with start offsets and durations in ms for the waterfall."""
    spans = [
        mpb.Span(
            name="gateway.Generate", service_name="g", start_unix_nano=1_000_000, end_unix_nano=9_000_000
        ),
        mpb.Span(
            name="engine.Generate",
            service_name="e",
            start_unix_nano=3_000_000,
            end_unix_nano=8_000_000,
            status_code=2,
        ),
    ]
    doc = trace_document(spans)
    assert [(s["start_ms"], s["duration_ms"], s["error"]) for s in doc["spans"]] == [
        (0.0, 8.0, False),
        (2.0, 5.0, True),
    ]
    assert trace_document([]) == {"spans": []}


def test_a_replica_that_left_is_not_drawn_on():
    """KV-cache use of a replica whose last point is older than the slack is no value (the line ends)."""
    now = 1_000_000.0
    b = board(now)
    b.kv.on_point({"replica_id": "gone"}, now - 3600, 0.9)
    assert "gone" not in b.document(60.0, now)["kv_cache_usage"]

"""Latency statistics from mergeable sketches: percentiles within the sketch's accuracy, exact merges, windows
made of time buckets, and bounded memory."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.metrics.latency import RequestStats
from services.metrics.quality import QualityStore
from services.metrics.records import RequestRecord
from services.metrics.sketches import RELATIVE_ACCURACY, TieredBuckets, merged, new_sketch, summarize


def rec(end: float, ttft: float | None = 5.0, tokens: int = 3, code: int = 0, e2e: float = 25.0, **kw):
    return RequestRecord(
        end_unix_s=end, e2e_ms=e2e, ttft_ms=ttft, output_tokens=tokens, status_code=code, model="m", **kw
    )


def within_accuracy(estimate: float, values, q: float) -> bool:
    """DDSketch's promise: the estimate is within the relative accuracy of the value of rank q * (n - 1)."""
    exact = float(np.quantile(np.asarray(values), q, method="lower"))
    return abs(estimate - exact) <= RELATIVE_ACCURACY * exact + 1e-9


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0.01, max_value=1e6, allow_nan=False), min_size=1, max_size=300))
def test_sketch_percentiles_within_relative_accuracy_and_mean_exact(values):
    """p50/p95/p99 are within 1% of the sample at their rank; the mean and count are exact."""
    s = new_sketch()
    for v in values:
        s.add(v)
    summary = summarize(s)
    assert summary.count == len(values)
    assert summary.mean == pytest.approx(float(np.mean(values)), rel=1e-9)
    for q, got in ((0.5, summary.p50), (0.95, summary.p95), (0.99, summary.p99)):
        assert within_accuracy(got, values, q), (q, got)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(min_value=0.01, max_value=1e5), min_size=1, max_size=100),
    st.lists(st.floats(min_value=0.01, max_value=1e5), min_size=1, max_size=100),
)
def test_merge_is_exact(a, b):
    """Merging the sketches of two windows gives the same percentiles as one sketch of all their values."""
    sa, sb, sall = new_sketch(), new_sketch(), new_sketch()
    for v in a:
        sa.add(v)
        sall.add(v)
    for v in b:
        sb.add(v)
        sall.add(v)
    m = summarize(merged([sa, sb]))
    one = summarize(sall)
    assert (m.count, m.p50, m.p95, m.p99) == (one.count, one.p50, one.p95, one.p99)
    assert m.mean == pytest.approx(one.mean)


def test_summary_of_known_values():
    """Ranks are q * (n - 1), rounded down: p50 of 10..50 is 30, p95 and p99 are 40 (within 1%)."""
    s = new_sketch()
    for v in (10.0, 20.0, 30.0, 40.0, 50.0):
        s.add(v)
    summary = summarize(s)
    assert summary.p50 == pytest.approx(30.0, rel=RELATIVE_ACCURACY)
    assert summary.p99 == pytest.approx(40.0, rel=RELATIVE_ACCURACY)
    assert summary.mean == 30.0
    assert summarize(None).count == 0 and summarize(new_sketch()).p99 == 0.0


def test_query_window_and_model_filter():
    """Only records that ended inside the window count; a model with none is left out."""
    now = 1000.0
    stats = RequestStats(clock=lambda: now)
    stats.add(rec(900.0, ttft=1.0))
    stats.add(rec(995.0, ttft=2.0))
    stats.add(RequestRecord(950.0, 25.0, 5.0, 3, 0, model="b"))
    (a,) = stats.query("m", window_s=10)
    assert a.requests == 1 and a.ttft_ms.p50 == pytest.approx(2.0, rel=RELATIVE_ACCURACY)
    assert [m.model for m in stats.query(window_s=10)] == ["m"]
    assert [m.model for m in stats.query()] == ["b", "m"]
    assert stats.query("nope") == []


def test_error_rate_tokens_and_e2e_of_ok_requests():
    """errors / requests, token totals, and E2E only over requests that finished OK."""
    stats = RequestStats(clock=lambda: 0.0)
    for code in (0, 0, 3, 14):
        stats.add(rec(0.0, code=code, tokens=4, prompt_tokens=10))
    (m,) = stats.query("m")
    assert (m.requests, m.errors, m.error_rate, m.output_tokens, m.prompt_tokens) == (4, 1, 0.25, 16, 40)
    assert m.e2e_ms.count == 2


def test_versions_and_tiers_merge_into_the_model():
    """Records of one model under several versions and tiers add up in its summary."""
    stats = RequestStats(clock=lambda: 0.0)
    stats.add(rec(0.0, ttft=10.0, version="v1", tier="batch"))
    stats.add(rec(0.0, ttft=30.0, version="v2", tier="interactive"))
    (m,) = stats.query("m")
    assert m.requests == 2 and m.ttft_ms.mean == 20.0
    assert stats.keys() == [("m", "v1", "batch"), ("m", "v2", "interactive")]
    (v2,) = stats.query("m", version="v2")
    assert v2.requests == 1 and v2.ttft_ms.mean == 30.0


def test_old_buckets_roll_into_coarse_ones_and_expire():
    """A fine bucket older than its tier keeps moves into a coarse bucket (still counted); past the last tier's
    retention it is gone. Memory is bounded by buckets, not requests."""
    t = [0.0]
    stats = RequestStats(clock=lambda: t[0], tiers=((10.0, 60.0), (60.0, 600.0)))
    for i in range(1000):
        stats.add(rec(i * 0.05))  # 1000 requests in the first 50 s
    t[0] = 200.0
    (m,) = stats.query("m")
    assert m.requests == 1000
    series = stats._keys[("m", "", "")]
    assert len(series) <= 2, "rolled into coarse 60 s buckets"
    t[0] = 1000.0
    assert stats.query("m") == []
    assert len(series) == 0


def test_late_records_beyond_retention_are_dropped_and_counted():
    """A record older than every tier keeps is dropped (and counted), not kept forever."""
    stats = RequestStats(clock=lambda: 10_000.0, tiers=((10.0, 60.0), (60.0, 600.0)))
    stats.add(rec(1.0))
    assert stats.dropped_late == 1 and stats.query() == []


def test_keys_are_bounded():
    """Past max_keys, records for new (model, version, tier) keys are dropped; known keys still count."""
    stats = RequestStats(clock=lambda: 0.0, max_keys=2)
    for version in ("a", "b", "c"):
        stats.add(rec(0.0, version=version))
    stats.add(rec(0.0, version="a"))
    assert stats.dropped_keys == 1
    assert stats.query("m")[0].requests == 3


def test_series_has_one_point_per_bucket_with_slowest_exemplar():
    """The dashboard's series: one point per 10 s bucket, carrying the slowest request's trace id."""
    stats = RequestStats(clock=lambda: 100.0)
    stats.add(rec(71.0, ttft=5.0, trace_id="a" * 32))
    stats.add(rec(72.0, ttft=50.0, trace_id="b" * 32))
    stats.add(rec(95.0, ttft=7.0, trace_id="c" * 32))
    points = stats.series("m", window_s=60)
    assert [p.t for p in points] == [70.0, 90.0]
    assert points[0].bucket.requests == 2 and points[0].bucket.slowest_ttft.trace_id == "b" * 32


def test_tiered_buckets_refuse_bad_tiers():
    """A tier whose keep is shorter than its width makes no sense."""
    with pytest.raises(ValueError):
        TieredBuckets(list, ((10.0, 5.0),))


def test_overlap_window_counts_edge_buckets_whole():
    """A window starting just after a bucket's midpoint leaves that bucket out by default and takes it whole
    with overlap (CompareVersions' explicit windows), so a short window over fresh traffic is never empty."""
    stats = RequestStats(clock=lambda: 1010.0)
    stats.add(rec(1008.0))
    assert stats.window(3.0, 1010.0).requests == 0
    assert stats.window(3.0, 1010.0, overlap=True).requests == 1


def _engine_span(t: float, version: str, refusal):
    from opentelemetry.proto.trace.v1 import trace_pb2

    attrs = {"fleetserve.model": "m", "fleetserve.model_version": version}
    if refusal is not None:
        attrs["fleetserve.output_refusal"] = refusal
    return trace_pb2.Span(name="engine.Generate", end_time_unix_nano=int(t * 1e9)), attrs


def _feedback_span(t: float, version: str, rating):
    from opentelemetry.proto.common.v1 import common_pb2
    from opentelemetry.proto.trace.v1 import trace_pb2

    span = trace_pb2.Span(name="gateway.Feedback", end_time_unix_nano=int(t * 1e9))
    attrs = [
        common_pb2.KeyValue(key="fleetserve.model", value=common_pb2.AnyValue(string_value="m")),
        common_pb2.KeyValue(key="fleetserve.model_version", value=common_pb2.AnyValue(string_value=version)),
        common_pb2.KeyValue(key="fleetserve.feedback.rating", value=common_pb2.AnyValue(int_value=rating)),
    ]
    span.events.add(name="fleetserve.feedback", time_unix_nano=int(t * 1e9), attributes=attrs)
    return span


def test_query_counts_refusals_and_feedback_per_version_in_the_window():
    """Engine spans' refusal checks and feedback ratings count per model version in Query: refusal_checked is
    the finished generations carrying the check (a cut-short attempt without it is left out), feedback_mean the
    mean of valid 1-5 ratings; other versions and what ended before the window are not counted."""
    now = 1000.0
    stats = RequestStats(clock=lambda: now)
    # Ratings reach the per-version stats through the quality store's one feedback parser, as in the service.
    quality = QualityStore(clock=lambda: now)
    quality.rating_sinks.append(stats.add_rating)
    for v in ("v1", "v2"):
        stats.add(rec(995.0, version=v))
    for i in range(10):
        stats.add_engine_span(*_engine_span(995.0, "v2", i < 3), "")
    stats.add_engine_span(*_engine_span(995.0, "v2", None), "")  # cut short: no check
    stats.add_engine_span(*_engine_span(900.0, "v2", True), "")  # before the window
    stats.add_engine_span(*_engine_span(995.0, "v1", False), "")
    for rating in (2, 4, 9):  # 9 is not a rating
        quality.add_feedback_span(_feedback_span(996.0, "v2", rating), {}, "")
    (v2,) = stats.query("m", window_s=10, version="v2")
    assert (v2.refusals, v2.refusal_checked, v2.feedback_count, v2.feedback_mean) == (3, 10, 2, 3.0)
    (v1,) = stats.query("m", window_s=10, version="v1")
    assert (v1.refusals, v1.refusal_checked, v1.feedback_count, v1.feedback_mean) == (0, 1, 0, 0.0)
    (both,) = stats.query("m", window_s=0)
    assert (both.refusals, both.refusal_checked, both.requests) == (4, 12, 2)

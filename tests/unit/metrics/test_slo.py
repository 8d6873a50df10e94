"""SLO math: TPOT, percentiles, which status codes are the fleet's errors, records from spans, windows."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.metrics.slo import RequestRecord, SloStats, is_fleet_error, record_from_span, summarize, tpot_ms


def test_tpot_is_time_after_first_token_over_remaining_tokens():
    """TPOT = (e2e - ttft) / (tokens - 1), undefined below two tokens or without a first token."""
    assert tpot_ms(110.0, 10.0, 11) == 10.0
    assert tpot_ms(110.0, 10.0, 2) == 100.0
    assert tpot_ms(110.0, 10.0, 1) is None
    assert tpot_ms(110.0, 10.0, 0) is None
    assert tpot_ms(110.0, None, 5) is None


def test_summarize_matches_numpy_percentiles():
    """p50/p95/p99 are numpy's (linear interpolation) and count is the number of samples."""
    s = summarize([10.0, 20.0, 30.0, 40.0, 50.0])
    assert (s.count, s.p50, s.p95, s.p99) == (5, 30.0, 48.0, pytest.approx(49.6))
    assert summarize([]).count == 0 and summarize([]).p99 == 0.0
    assert summarize([7.0]).p50 == 7.0


@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=200))
def test_summarize_is_ordered_and_within_range(values):
    """For any samples, min <= p50 <= p95 <= p99 <= max."""
    s = summarize(values)
    eps = 1e-9 * max(1.0, max(values))
    assert min(values) - eps <= s.p50 <= s.p95 + eps <= s.p99 + 2 * eps <= max(values) + 3 * eps
    assert s.count == len(values)


@pytest.mark.parametrize("code", [0, 1, 3, 5, 7, 8, 16])
def test_client_faults_cancellations_and_backpressure_are_not_fleet_errors(code):
    """OK, CANCELLED, INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNAUTHENTICATED."""
    assert not is_fleet_error(code)


@pytest.mark.parametrize("code", [2, 4, 6, 9, 10, 11, 12, 13, 14, 15])
def test_other_codes_are_fleet_errors(code):
    """UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE and the rest count against the fleet."""
    assert is_fleet_error(code)


def test_record_from_span_reads_gateway_attributes():
    """Model, TTFT, output tokens and status come from the attributes; E2E from the span's times."""
    attrs = {
        "fleetserve.model": "m",
        "fleetserve.ttft_ms": 12.5,
        "fleetserve.output_tokens": 5,
        "rpc.grpc.status_code": 14,
    }
    model, rec = record_from_span(1_000_000_000, 1_100_000_000, attrs)
    assert model == "m"
    assert rec == RequestRecord(end_unix_s=1.1, e2e_ms=100.0, ttft_ms=12.5, output_tokens=5, status_code=14)
    assert rec.fleet_error
    assert rec.tpot_ms == pytest.approx((100.0 - 12.5) / 4)


def test_record_without_model_is_ignored_and_missing_code_uses_span_status():
    """No model: no record. No gRPC code: an ERROR span status counts as a fleet error, else OK."""
    assert record_from_span(0, 1, {"fleetserve.ttft_ms": 1.0}) is None
    _, rec = record_from_span(0, 1_000_000, {"fleetserve.model": "m"}, otlp_status_code=2)
    assert rec.fleet_error and rec.ttft_ms is None and rec.output_tokens == 0
    _, rec = record_from_span(0, 1_000_000, {"fleetserve.model": "m"}, otlp_status_code=0)
    assert not rec.fleet_error


def rec(
    end: float, ttft: float | None = 5.0, tokens: int = 3, code: int = 0, e2e: float = 25.0
) -> RequestRecord:
    return RequestRecord(end_unix_s=end, e2e_ms=e2e, ttft_ms=ttft, output_tokens=tokens, status_code=code)


def test_query_window_and_model_filter():
    """Only records that ended inside the window count; a model with none is left out."""
    stats = SloStats(100, clock=lambda: 1000.0)
    stats.add("a", rec(900.0, ttft=1.0))
    stats.add("a", rec(995.0, ttft=2.0))
    stats.add("b", rec(950.0))
    (a,) = stats.query("a", window_s=10)
    assert (a.requests, a.ttft_ms.p50) == (1, 2.0)
    assert [m.model for m in stats.query(window_s=10)] == ["a"]
    assert [m.model for m in stats.query()] == ["a", "b"]
    assert stats.query("nope") == []


def test_error_rate_and_token_totals():
    """errors / requests, and output tokens summed over every request in the window."""
    stats = SloStats(100, clock=lambda: 0.0)
    for code in (0, 0, 3, 14):
        stats.add("m", rec(0.0, code=code, tokens=4))
    (m,) = stats.query("m")
    assert (m.requests, m.errors, m.error_rate, m.output_tokens) == (4, 1, 0.25, 16)
    assert m.e2e_ms.count == 2


def test_records_per_model_are_bounded_oldest_dropped():
    """At most max_records_per_model records are kept per model; the newest survive."""
    stats = SloStats(3, clock=lambda: 0.0)
    for i in range(10):
        stats.add("m", rec(0.0, ttft=float(i)))
    (m,) = stats.query("m")
    assert m.requests == 3
    assert m.ttft_ms.p50 == 8.0


def test_models_are_bounded():
    """Past max_models, records for new model names are dropped; known models still count."""
    stats = SloStats(10, clock=lambda: 0.0, max_models=2)
    for name in ("a", "b", "c"):
        stats.add(name, rec(0.0))
    stats.add("a", rec(0.0))
    assert stats.models() == ["a", "b"]
    assert stats.dropped_models == 1
    assert stats.query("a")[0].requests == 2

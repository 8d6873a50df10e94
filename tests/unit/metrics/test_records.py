"""Request records: TPOT, which status codes are the fleet's errors, and records read from root spans."""

from __future__ import annotations

import pytest

from services.metrics.records import RequestRecord, is_fleet_error, record_from_span, tpot_ms


def test_tpot_is_time_after_first_token_over_remaining_tokens():
    """TPOT = (e2e - ttft) / (tokens - 1), undefined below two tokens or without a first token."""
    assert tpot_ms(110.0, 10.0, 11) == 10.0
    assert tpot_ms(110.0, 10.0, 2) == 100.0
    assert tpot_ms(110.0, 10.0, 1) is None
    assert tpot_ms(110.0, 10.0, 0) is None
    assert tpot_ms(110.0, None, 5) is None


@pytest.mark.parametrize("code", [0, 1, 3, 5, 7, 8, 16])
def test_client_faults_cancellations_and_backpressure_are_not_fleet_errors(code):
    """OK, CANCELLED, INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNAUTHENTICATED."""
    assert not is_fleet_error(code)


@pytest.mark.parametrize("code", [2, 4, 6, 9, 10, 11, 12, 13, 14, 15])
def test_other_codes_are_fleet_errors(code):
    """UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE and the rest count against the fleet."""
    assert is_fleet_error(code)


def test_record_from_span_reads_gateway_attributes():
    """Model, TTFT, tokens, status and the cost/quality dimensions come from the attributes; E2E from the
    span's times."""
    attrs = {
        "fleetserve.model": "auto",
        "fleetserve.served_model": "small",
        "fleetserve.model_version": "v2",
        "fleetserve.tenant_id": "acme",
        "fleetserve.tenant_tier": "batch",
        "fleetserve.feature": "summarize",
        "fleetserve.replica_id": "engine-1",
        "fleetserve.request_id": "r1",
        "fleetserve.ttft_ms": 12.5,
        "fleetserve.output_tokens": 5,
        "fleetserve.prompt_tokens": 40,
        "fleetserve.cached_tokens": 16,
        "rpc.grpc.status_code": 14,
    }
    rec = record_from_span(1_000_000_000, 1_100_000_000, attrs, trace_id="ab" * 16)
    assert rec == RequestRecord(
        end_unix_s=1.1,
        e2e_ms=100.0,
        ttft_ms=12.5,
        output_tokens=5,
        status_code=14,
        model="small",
        requested_model="auto",
        version="v2",
        tenant="acme",
        tier="batch",
        feature="summarize",
        replica_id="engine-1",
        prompt_tokens=40,
        cached_tokens=16,
        trace_id="ab" * 16,
        request_id="r1",
    )
    assert rec.fleet_error and rec.routed_by_alias
    assert rec.tpot_ms == pytest.approx((100.0 - 12.5) / 4)


def test_record_without_model_is_ignored_and_missing_code_uses_span_status():
    """No model: no record. No gRPC code: an ERROR span status counts as a fleet error, else OK."""
    assert record_from_span(0, 1, {"fleetserve.ttft_ms": 1.0}) is None
    rec = record_from_span(0, 1_000_000, {"fleetserve.model": "m"}, otlp_status_code=2)
    assert rec.fleet_error and rec.ttft_ms is None and rec.output_tokens == 0
    rec = record_from_span(0, 1_000_000, {"fleetserve.model": "m"}, otlp_status_code=0)
    assert not rec.fleet_error and rec.model == "m" and not rec.routed_by_alias


def test_degraded_model_is_not_model_routing():
    """A request the gateway moved to a smaller model under load was degraded, not routed by an alias."""
    rec = record_from_span(
        0,
        1,
        {"fleetserve.model": "big", "fleetserve.served_model": "small", "fleetserve.degraded": "model=small"},
    )
    assert rec.model == "small" and not rec.routed_by_alias


def test_client_labels_are_bounded():
    """A feature tag or model name longer than 64 characters is cut, so one client cannot make huge keys."""
    rec = record_from_span(0, 1, {"fleetserve.model": "m" * 500, "fleetserve.feature": "f" * 500})
    assert len(rec.model) == 64 and len(rec.feature) == 64

"""Per-arm experiment samples in the metrics service: read from root spans and feedback events, summarised over
the first N samples (the fixed horizon), bounded."""

from __future__ import annotations

import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from services.metrics.experiments import ArmStore
from services.metrics.ingest import SpanIntake
from services.metrics.spans import SpanStore


def attrs(arm: str, ttft: float, tokens: int = 11, status: int = 0, **extra) -> dict:
    return {
        "fleetserve.experiment": "exp-1",
        "fleetserve.arm": arm,
        "fleetserve.ttft_ms": ttft,
        "fleetserve.output_tokens": tokens,
        "rpc.grpc.status_code": status,
        **extra,
    }


def summary(store: ArmStore, arm: str, metric: str, limit: int = 0):
    got = {a.arm: {m.metric: m for m in a.metrics} for a in store.query("exp-1", limit)}
    return got[arm].get(metric)


def test_requests_become_samples_of_every_metric():
    """TTFT, E2E, TPOT, tokens, cost and refusal per request; errors count as error_rate samples only."""
    store = ArmStore()
    store.add_request(0, int(110e6), attrs("a", 10.0))
    store.add_request(
        0, int(210e6), attrs("a", 20.0, **{"fleetserve.cost_usd": 0.002, "fleetserve.output_refusal": True})
    )
    store.add_request(0, int(50e6), attrs("a", 30.0, status=14))
    assert summary(store, "a", "error_rate").mean == pytest.approx(1 / 3)
    assert summary(store, "a", "ttft_ms").count == 3
    e2e = summary(store, "a", "e2e_ms")
    assert (e2e.count, e2e.mean) == (2, pytest.approx(160.0))
    assert summary(store, "a", "tpot_ms").mean == pytest.approx(((110 - 10) / 10 + (210 - 20) / 10) / 2)
    assert summary(store, "a", "cost_usd").count == 1
    assert summary(store, "a", "refusal_rate").mean == 1.0
    assert store.query("exp-1")[0].requests == 3
    assert not store.add_request(0, 1, {"fleetserve.model": "m"})  # no experiment: ignored


def test_the_horizon_reads_the_first_samples_only():
    """limit=N summarises exactly the first N samples (mean and n-1 std), whatever arrived after."""
    store = ArmStore()
    values = np.arange(1.0, 21.0)
    for v in values:
        store.add_request(0, int(1e9), attrs("b", float(v)))
    s = summary(store, "b", "ttft_ms", limit=5)
    assert (s.count, s.mean, s.std) == (5, 3.0, pytest.approx(values[:5].std(ddof=1)))


def test_feedback_events_become_rating_and_success_samples():
    """A gateway.Feedback span's fleetserve.feedback event naming an arm adds its rating and success signal."""

    def kv(k, v):
        value = common_pb2.AnyValue(
            **(
                {"bool_value": v}
                if isinstance(v, bool)
                else {"string_value": v}
                if isinstance(v, str)
                else {"int_value": v}
            )
        )
        return common_pb2.KeyValue(key=k, value=value)

    event = trace_pb2.Span.Event(
        name="fleetserve.feedback",
        attributes=[
            kv("fleetserve.experiment", "exp-1"), kv("fleetserve.arm", "a"), kv("fleetserve.feedback.rating", 4),
            kv("fleetserve.feedback.success", True),
        ],
    )  # fmt: skip
    span = trace_pb2.Span(trace_id=b"\1" * 16, span_id=b"\2" * 8, name="gateway.Feedback", events=[event])
    req = otlp.ExportTraceServiceRequest(
        resource_spans=[trace_pb2.ResourceSpans(scope_spans=[trace_pb2.ScopeSpans(spans=[span])])]
    )
    store = ArmStore()
    intake = SpanIntake(SpanStore(10))
    store.attach(intake)
    intake.ingest(req)
    assert summary(store, "a", "feedback_rating").mean == 4.0
    assert summary(store, "a", "success_rate").mean == 1.0


def test_samples_and_experiments_are_bounded():
    """Each series keeps its first max_samples; the least recently fed experiment goes beyond max_experiments."""
    store = ArmStore(max_samples=3, max_experiments=2)
    for i in range(5):
        store.add_request(0, 1, attrs("a", float(i)))
    assert summary(store, "a", "ttft_ms").count == 3
    store.add_request(0, 1, {**attrs("a", 1.0), "fleetserve.experiment": "exp-2"})
    store.add_request(0, 1, {**attrs("a", 1.0), "fleetserve.experiment": "exp-3"})
    assert store.query("exp-1") == [] and store.query("exp-3")

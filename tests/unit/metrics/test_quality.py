"""Quality signals per model version and the shift detector: engine spans, gateway records and feedback events
become counts; a candidate with more refusals, shorter outputs or worse ratings is flagged, an equal one not."""

from __future__ import annotations

import numpy as np
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from services.metrics.quality import (
    QualityBucket,
    QualityStore,
    length_test,
    proportion_test,
    ratings_test,
    shift_tests,
    signals,
)
from services.metrics.records import RequestRecord


def kv(key: str, value) -> common_pb2.KeyValue:
    v = common_pb2.AnyValue()
    if isinstance(value, bool):
        v.bool_value = value
    elif isinstance(value, int):
        v.int_value = value
    elif isinstance(value, float):
        v.double_value = value
    else:
        v.string_value = value
    return common_pb2.KeyValue(key=key, value=v)


def engine_span(t: float, version: str, tokens: int, refusal=False, empty=False, repetition=0.0):
    attrs = {
        "fleetserve.model": "m",
        "fleetserve.model_version": version,
        "fleetserve.output_tokens": tokens,
        "fleetserve.output_refusal": refusal,
        "fleetserve.output_empty": empty,
        "fleetserve.output_repetition": repetition,
    }
    span = trace_pb2.Span(name="engine.Generate", end_time_unix_nano=int(t * 1e9))
    return span, attrs


def feedback_span(t: float, request_id: str, rating: int):
    span = trace_pb2.Span(name="gateway.Feedback", end_time_unix_nano=int(t * 1e9))
    span.events.add(
        name="fleetserve.feedback",
        time_unix_nano=int(t * 1e9),
        attributes=[kv("fleetserve.request_id", request_id), kv("fleetserve.feedback.rating", rating)],
    )
    return span


def test_store_counts_generations_requests_and_feedback_by_version():
    """Engine spans give refusals, empties, repetitive outputs and lengths; gateway records give requests,
    errors and safety hits; feedback without a version is labelled from the request it rates."""
    q = QualityStore(clock=lambda: 100.0)
    for i in range(10):
        q.add_engine_span(
            *engine_span(50.0, "v2", 10 + i, refusal=i < 3, empty=i == 9, repetition=0.9 * (i == 8)), ""
        )
    q.add_engine_span(
        trace_pb2.Span(name="engine.Generate"), {"fleetserve.model": "m"}, ""
    )  # cut short: none
    q.add_record(RequestRecord(50.0, 1.0, None, 0, 14, model="m", version="v2", request_id="r1"))
    q.add_record(
        RequestRecord(50.0, 1.0, None, 0, 3, model="m", version="v2", safety_blocked="INPUT_BLOCKED")
    )
    q.add_feedback_span(feedback_span(60.0, "r1", 2), {}, "")
    q.add_feedback_span(feedback_span(60.0, "unknown", 5), {}, "")  # no model known: dropped
    b, lengths = q.window("m", "v2", 0.0, 100.0)
    s = signals("m", "v2", b, lengths)
    assert (s.generations, s.refusals, s.empty, s.repetitive) == (10, 3, 1, 1)
    assert (s.requests, s.errors, s.safety_blocked) == (2, 1, 1)
    assert list(s.ratings) == [0, 1, 0, 0, 0] and s.feedback_mean == 2.0
    assert s.output_tokens_median == 14.5 and s.refusal_rate == 0.3
    assert q.versions("m") == ["v2"]


def test_request_ids_for_feedback_are_bounded_oldest_dropped_first():
    """--quality-recent-requests: at most that many request ids are remembered; feedback on an older one has no
    version to label it with and is dropped."""
    q = QualityStore(clock=lambda: 100.0, recent=2)
    for rid in ("r1", "r2", "r3"):
        q.add_record(RequestRecord(50.0, 1.0, None, 0, 14, model="m", version="v2", request_id=rid))
    q.add_feedback_span(feedback_span(60.0, "r1", 1), {}, "")  # dropped from the index
    q.add_feedback_span(feedback_span(60.0, "r3", 5), {}, "")
    b, lengths = q.window("m", "v2", 0.0, 100.0)
    assert list(signals("m", "v2", b, lengths).ratings) == [0, 0, 0, 0, 1]


def test_more_refusals_is_a_shift_and_equal_rates_are_not():
    """20% refusals against 1% is flagged (chi-squared); 1% against 1% is not; small counts use Fisher's
    exact test; fewer samples than the minimum is insufficient data, never a verdict."""
    shifted = proportion_test("refusal_rate", (5, 100), (500, 500), 30)
    assert shifted.test == "chi-squared" and shifted.p_value < 1e-6
    same = proportion_test("refusal_rate", (5, 5), (500, 500), 30)
    assert same.p_value > 0.5
    small = proportion_test("refusal_rate", (0, 6), (40, 40), 30)
    assert small.test == "fisher-exact" and small.p_value < 0.05
    few = proportion_test("refusal_rate", (0, 10), (10, 10), 30)
    assert few.insufficient_data and few.p_value == 1.0


def test_length_drift_and_ratings():
    """Outputs half as long (Mann-Whitney U) and worse ratings (chi-squared) are flagged."""
    rng = np.random.default_rng(7)
    base = rng.integers(100, 200, 300).astype(float)
    assert length_test(base, base * 0.5, 30).p_value < 1e-6
    assert length_test(base, rng.permutation(base), 30).p_value > 0.5
    assert ratings_test([5, 5, 10, 40, 40], [30, 30, 20, 10, 10], 30).p_value < 1e-6
    assert ratings_test([5, 5, 10, 40, 40], [5, 5, 10, 40, 40], 30).p_value > 0.99


def test_shift_tests_mark_shifted_by_alpha():
    """Each signal gets a test; shifted means p < alpha on enough data."""
    b0 = QualityBucket(generations=400, refusals=4, requests=400, errors=2)
    b1 = QualityBucket(generations=400, refusals=80, requests=400, errors=2)
    lengths = np.arange(100.0, 500.0)
    tests = {t.signal: t for t in shift_tests(b0, lengths, b1, lengths, 0.01, 30)}
    assert set(tests) == {
        "output_tokens",
        "feedback_rating",
        "refusal_rate",
        "empty_rate",
        "repetitive_rate",
        "safety_rate",
        "error_rate",
    }
    assert tests["refusal_rate"].shifted and not tests["error_rate"].shifted
    assert not tests["output_tokens"].shifted and tests["feedback_rating"].insufficient_data

"""The span store: traces by id in start order, bounded with the oldest span evicted first."""

from __future__ import annotations

import pytest
from fleetserve.metrics.v1 import metrics_service_pb2 as mpb

from services.metrics.spans import SpanStore


def span(trace: int, sid: int, start: int = 0) -> mpb.Span:
    return mpb.Span(trace_id=f"{trace:032x}", span_id=f"{sid:016x}", name=f"s{sid}", start_unix_nano=start)


def test_trace_returns_its_spans_in_start_order():
    """Spans of one trace come back sorted by start time, other traces' spans left out."""
    store = SpanStore(100)
    store.add(span(1, 1, start=30))
    store.add(span(2, 2, start=10))
    store.add(span(1, 3, start=20))
    assert [s.name for s in store.trace(f"{1:032x}")] == ["s3", "s1"]
    assert store.trace(f"{9:032x}") == []


def test_trace_id_lookup_ignores_case():
    """An upper-case hex id finds the same trace."""
    store = SpanStore(10)
    store.add(span(0xABC, 1))
    assert len(store.trace(f"{0xABC:032X}")) == 1


def test_full_store_evicts_the_oldest_span_first():
    """Past max_spans, the earliest received span goes; a trace whose spans are all gone is forgotten."""
    store = SpanStore(3)
    store.add(span(1, 1))
    store.add(span(2, 2))
    store.add(span(1, 3))
    store.add(span(3, 4))  # evicts trace 1's first span
    assert len(store) == 3 and store.evicted == 1
    assert [s.name for s in store.trace(f"{1:032x}")] == ["s3"]
    store.add(span(3, 5))  # evicts trace 2's only span
    assert store.trace(f"{2:032x}") == []
    assert store.traces == 2


def test_store_stays_bounded_under_many_spans():
    """However many spans arrive, at most max_spans are kept and the index holds no empty traces."""
    store = SpanStore(50)
    for i in range(1000):
        store.add(span(i % 7, i))
    assert len(store) == 50
    assert sum(len(store.trace(f"{t:032x}")) for t in range(7)) == 50
    assert store.evicted == 950


def test_max_spans_must_be_positive():
    """A store that could hold nothing is refused."""
    with pytest.raises(ValueError):
        SpanStore(0)

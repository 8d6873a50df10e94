"""A bounded store of flattened spans, indexed by trace id, that evicts the oldest span first."""

from __future__ import annotations

from collections import deque

from fleetserve.metrics.v1 import metrics_service_pb2 as mpb


class SpanStore:
    """At most max_spans spans. Each is kept serialized (a few hundred bytes instead of a live message) and
    parsed again only when its trace is asked for."""

    def __init__(self, max_spans: int) -> None:
        if max_spans < 1:
            raise ValueError("max_spans must be at least 1")
        self.max_spans = max_spans
        # Trace id of every kept span in arrival order: the left end is the next to evict.
        self._order: deque[str] = deque()
        # Per trace, (start, serialized span) in arrival order, so a trace's oldest span is on the left too.
        self._by_trace: dict[str, deque[tuple[int, bytes]]] = {}
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._order)

    @property
    def traces(self) -> int:
        return len(self._by_trace)

    def add(self, span: mpb.Span) -> None:
        """Keep span, evicting the oldest kept span if the store is full."""
        if len(self._order) >= self.max_spans:
            self._evict_oldest()
        tid = span.trace_id
        spans = self._by_trace.get(tid)
        if spans is None:
            spans = self._by_trace[tid] = deque()
        spans.append((span.start_unix_nano, span.SerializeToString()))
        self._order.append(tid)

    def trace(self, trace_id: str) -> list[mpb.Span]:
        """The kept spans of a trace (lower-case hex id), in order of start time."""
        spans = self._by_trace.get(trace_id.lower())
        if not spans:
            return []
        return [mpb.Span.FromString(data) for _, data in sorted(spans, key=lambda s: s[0])]

    def _evict_oldest(self) -> None:
        tid = self._order.popleft()
        spans = self._by_trace[tid]
        spans.popleft()
        if not spans:
            del self._by_trace[tid]
        self.evicted += 1

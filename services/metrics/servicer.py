"""fleetserve.metrics.v1.MetricsService: latency and error summaries per model, and traces by id."""

from __future__ import annotations

import re

from fleetserve.metrics.v1 import metrics_service_pb2 as mpb

from services.metrics.counters import CounterStore
from services.metrics.slo import SloStats
from services.metrics.spans import SpanStore
from shared.errors import InvalidArgument, rpc_boundary

_TRACE_ID = re.compile(r"^[0-9a-fA-F]{32}$")


class MetricsServicer:
    """Answers from what the OTLP receivers have stored."""

    def __init__(self, spans: SpanStore, slo: SloStats, counters: CounterStore) -> None:
        self.spans = spans
        self.slo = slo
        self.counters = counters

    @rpc_boundary
    async def Query(self, request: mpb.QueryRequest, context) -> mpb.QueryResponse:
        if request.window_s < 0:
            raise InvalidArgument(
                "window_s must not be negative",
                field_violations=[("window_s", "must be >= 0 (0: everything kept)")],
            )
        return mpb.QueryResponse(
            models=self.slo.query(request.model, request.window_s), counters=self.counters.totals()
        )

    @rpc_boundary
    async def GetTrace(self, request: mpb.GetTraceRequest, context) -> mpb.GetTraceResponse:
        if not _TRACE_ID.match(request.trace_id):
            raise InvalidArgument(
                "trace_id must be 32 hex digits", field_violations=[("trace_id", "must be 32 hex digits")]
            )
        # An unknown trace is an empty answer, not NOT_FOUND: its spans may simply not have arrived yet.
        return mpb.GetTraceResponse(spans=self.spans.trace(request.trace_id))

"""OTLP/gRPC receivers: the standard TraceService and MetricsService Export, feeding the collector's stores."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as otlp_metrics_svc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as otlp_metrics_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp_trace_svc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_trace_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from services.metrics.otlp import attributes_of, flatten_span, service_name
from services.metrics.records import ROOT_SPANS, RequestRecord, record_from_span
from services.metrics.spans import SpanStore
from shared.errors import rpc_boundary

log = structlog.get_logger(__name__)

# What reads request records (latency stats, SLOs, cost, quality), and what reads other spans by name
# (engine.Generate for output quality, gateway.Feedback for ratings): (span, its attributes, its trace id).
RecordSink = Callable[[RequestRecord], None]
SpanSink = Callable[[trace_pb2.Span, dict[str, Any], str], None]


class SpanIntake:
    """Keeps every span and hands each to the sinks that want it: root spans as request records."""

    def __init__(self, spans: SpanStore) -> None:
        self.spans = spans
        self.record_sinks: list[RecordSink] = []
        self.span_sinks: dict[str, list[SpanSink]] = {}

    def on_span(self, name: str, sink: SpanSink) -> None:
        self.span_sinks.setdefault(name, []).append(sink)

    def ingest(self, request: otlp_trace_svc.ExportTraceServiceRequest) -> int:
        """Take every span of an export; the span count."""
        n = 0
        for rs in request.resource_spans:
            service = service_name(rs.resource)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    attrs = attributes_of(span.attributes)
                    flat = flatten_span(span, service, attrs)
                    self.spans.add(flat)
                    if span.name in ROOT_SPANS:
                        self._record(span, attrs, flat.trace_id)
                    for sink in self.span_sinks.get(span.name, ()):
                        self._safely(sink, span, attrs, flat.trace_id)
                    n += 1
        return n

    def _record(self, span: trace_pb2.Span, attrs: dict[str, Any], trace_id: str) -> None:
        record = record_from_span(
            span.start_time_unix_nano, span.end_time_unix_nano, attrs, span.status.code, trace_id
        )
        if record is None:
            return
        for sink in self.record_sinks:
            self._safely(sink, record)

    @staticmethod
    def _safely(sink, *args) -> None:
        # One store's bug must not lose the span for the others (nor fail the exporter, which would resend it).
        try:
            sink(*args)
        except Exception:  # noqa: BLE001
            log.exception("metrics.sink_failed", sink=getattr(sink, "__qualname__", repr(sink)))


class TraceReceiver(otlp_trace_grpc.TraceServiceServicer):
    """opentelemetry.proto.collector.trace.v1.TraceService: where services' OTLP span exporters send."""

    def __init__(self, intake: SpanIntake) -> None:
        self.intake = intake
        self.received = 0

    # No span per Export: tracing the collector's own intake would feed it spans about itself.
    @rpc_boundary
    async def Export(self, request, context) -> otlp_trace_svc.ExportTraceServiceResponse:
        self.received += self.intake.ingest(request)
        return otlp_trace_svc.ExportTraceServiceResponse()


class MetricsReceiver(otlp_metrics_grpc.MetricsServiceServicer):
    """opentelemetry.proto.collector.metrics.v1.MetricsService: where OTLP metric exporters send; every store
    in `stores` reads each export (counters from Sums, gauges from Gauges)."""

    def __init__(self, *stores) -> None:
        self.stores = stores
        self.received = 0

    @rpc_boundary
    async def Export(self, request, context) -> otlp_metrics_svc.ExportMetricsServiceResponse:
        for store in self.stores:
            self.received += store.ingest(request)
        return otlp_metrics_svc.ExportMetricsServiceResponse()

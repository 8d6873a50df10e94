"""OTLP/gRPC receivers: the standard TraceService and MetricsService Export, feeding the collector's stores."""

from __future__ import annotations

import structlog
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as otlp_metrics_svc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as otlp_metrics_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp_trace_svc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_trace_grpc

from services.metrics.counters import CounterStore
from services.metrics.otlp import attributes_of, flatten_span, service_name
from services.metrics.slo import ROOT_SPAN, SloStats
from services.metrics.spans import SpanStore
from shared.errors import rpc_boundary

log = structlog.get_logger(__name__)


def ingest_spans(request: otlp_trace_svc.ExportTraceServiceRequest, spans: SpanStore, slo: SloStats) -> int:
    """Keep every span of an export and turn the gateway's root spans into request records; the span count."""
    n = 0
    for rs in request.resource_spans:
        service = service_name(rs.resource)
        for ss in rs.scope_spans:
            for span in ss.spans:
                attrs = attributes_of(span.attributes)
                spans.add(flatten_span(span, service, attrs))
                if span.name == ROOT_SPAN:
                    slo.add_span(span.start_time_unix_nano, span.end_time_unix_nano, attrs, span.status.code)
                n += 1
    return n


class TraceReceiver(otlp_trace_grpc.TraceServiceServicer):
    """opentelemetry.proto.collector.trace.v1.TraceService: where services' OTLP span exporters send."""

    def __init__(self, spans: SpanStore, slo: SloStats) -> None:
        self.spans = spans
        self.slo = slo
        self.received = 0

    # No span per Export: tracing the collector's own intake would feed it spans about itself.
    @rpc_boundary
    async def Export(self, request, context) -> otlp_trace_svc.ExportTraceServiceResponse:
        self.received += ingest_spans(request, self.spans, self.slo)
        return otlp_trace_svc.ExportTraceServiceResponse()


class MetricsReceiver(otlp_metrics_grpc.MetricsServiceServicer):
    """opentelemetry.proto.collector.metrics.v1.MetricsService: where OTLP metric exporters send."""

    def __init__(self, counters: CounterStore) -> None:
        self.counters = counters
        self.received = 0

    @rpc_boundary
    async def Export(self, request, context) -> otlp_metrics_svc.ExportMetricsServiceResponse:
        self.received += self.counters.ingest(request)
        return otlp_metrics_svc.ExportMetricsServiceResponse()

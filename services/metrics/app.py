"""Metrics collector wiring: the stores, the OTLP receivers and the query service on one server."""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from fleetserve.metrics.v1 import metrics_service_pb2 as mpb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as otlp_metrics_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_trace_grpc

from services.metrics.config import MetricsSettings
from services.metrics.counters import CounterStore
from services.metrics.ingest import MetricsReceiver, TraceReceiver
from services.metrics.servicer import MetricsServicer
from services.metrics.slo import SloStats
from services.metrics.spans import SpanStore
from shared.server import RunningServer, Service, create_server, drain_and_stop
from shared.telemetry import Telemetry

log = structlog.get_logger(__name__)


@dataclass
class MetricsApp:
    """A started metrics collector."""

    running: RunningServer
    servicer: MetricsServicer
    traces: TraceReceiver
    metrics: MetricsReceiver

    @property
    def address(self) -> str:
        return self.running.address

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING, let in-flight exports and queries finish within grace_s, then stop."""
        await drain_and_stop(self.running, grace_s)
        log.info(
            "metrics.summary",
            spans_received=self.traces.received,
            spans_kept=len(self.servicer.spans),
            spans_evicted=self.servicer.spans.evicted,
            points_received=self.metrics.received,
        )


async def start(settings: MetricsSettings, telemetry: Telemetry) -> MetricsApp:
    """Serve OTLP ingestion (TraceService, MetricsService) and MetricsService queries on one port."""
    spans = SpanStore(settings.max_spans)
    slo = SloStats(settings.max_records_per_model)
    counters = CounterStore()
    servicer = MetricsServicer(spans, slo, counters)
    traces = TraceReceiver(spans, slo)
    metrics = MetricsReceiver(counters)
    running = await create_server(
        [Service(mpb, "MetricsService", servicer)],
        settings.host,
        settings.port,
        extra=(
            lambda s: otlp_trace_grpc.add_TraceServiceServicer_to_server(traces, s),
            lambda s: otlp_metrics_grpc.add_MetricsServiceServicer_to_server(metrics, s),
        ),
    )
    log.info(
        "metrics.configured",
        max_spans=settings.max_spans,
        max_records_per_model=settings.max_records_per_model,
    )
    return MetricsApp(running, servicer, traces, metrics)

"""Metrics collector wiring: the stores, the OTLP receivers, the query service and the SLO evaluation loop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import structlog
from fleetserve.metrics.v1 import metrics_service_pb2 as mpb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as otlp_metrics_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_trace_grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import CollectorRegistry

from services.metrics.config import MetricsSettings
from services.metrics.cost import CostLedger, PriceBook, parse_prices
from services.metrics.counters import CounterStore
from services.metrics.dashboard.api import Dashboard
from services.metrics.dashboard.server import DashboardServer
from services.metrics.experiments import ArmStore
from services.metrics.gauges import DESIRED_REPLICAS, KV_USAGE, UPTIME, GaugeHistory, GaugeStore, ReplicaClock
from services.metrics.ingest import MetricsReceiver, SpanIntake, TraceReceiver
from services.metrics.latency import RequestStats
from services.metrics.quality import ENGINE_SPAN, FEEDBACK_SPAN, QualityStore, warm_up
from services.metrics.servicer import MetricsServicer
from services.metrics.slo import SloEngine, load_slo_config
from services.metrics.spans import SpanStore
from services.router.model_routing import parse_aliases
from shared import prom
from shared.server import RunningServer, Service, cancel_and_wait, create_server, drain_and_stop
from shared.telemetry import Telemetry
from shared.tls import Tls, scheme

log = structlog.get_logger(__name__)


@dataclass
class MetricsApp:
    """A started metrics collector."""

    running: RunningServer
    servicer: MetricsServicer
    traces: TraceReceiver
    metrics: MetricsReceiver
    tasks: list[asyncio.Task] = field(default_factory=list)
    dashboard: DashboardServer | None = None
    # The collector's own Prometheus series (served on its /metrics): is it keeping up with what it receives?
    metrics_registry: CollectorRegistry | None = None

    @property
    def address(self) -> str:
        return self.running.address

    @property
    def ready_info(self) -> dict[str, str]:
        """What launchers learn from the ready file besides the gRPC address."""
        return {"dashboard_address": self.dashboard.address} if self.dashboard else {}

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING, end alert watches, let in-flight exports and queries finish within grace_s, then stop."""

        async def before_stop() -> None:
            await cancel_and_wait(self.tasks)
            self.servicer.close_watches()
            if self.dashboard is not None:
                await self.dashboard.stop()

        await drain_and_stop(self.running, grace_s, before_stop=before_stop)
        log.info(
            "metrics.summary",
            spans_received=self.traces.received,
            spans_kept=len(self.servicer.spans),
            spans_evicted=self.servicer.spans.evicted,
            points_received=self.metrics.received,
        )


def intake_families(traces: TraceReceiver, spans: SpanStore, metrics: MetricsReceiver) -> list[Metric]:
    """What the collector has taken in: spans received, kept and evicted, metric points received."""
    return [
        CounterMetricFamily(
            "fleetserve:collector_spans_received", "Spans received over OTLP.", value=traces.received
        ),
        CounterMetricFamily(
            "fleetserve:collector_spans_evicted",
            "Spans dropped to stay within --max-spans (the oldest first).",
            value=spans.evicted,
        ),
        GaugeMetricFamily("fleetserve:collector_spans_kept", "Spans kept for GetTrace.", value=len(spans)),
        CounterMetricFamily(
            "fleetserve:collector_metric_points_received",
            "OTLP metric data points received.",
            value=metrics.received,
        ),
    ]


async def evaluate_slos(slo: SloEngine, interval_s: float) -> None:
    """Evaluate the alert rules every interval_s until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            slo.evaluate()
        except Exception:  # noqa: BLE001 - one bad evaluation must not stop alerting for good
            log.exception("metrics.slo_evaluation_failed")


async def start(settings: MetricsSettings, telemetry: Telemetry) -> MetricsApp:
    """Serve OTLP ingestion (TraceService, MetricsService) and MetricsService queries on one port."""
    tls = Tls.from_settings(settings)
    slo_config = load_slo_config(settings.slo_file, settings.slo_time_scale, settings.slo_min_events)
    spans = SpanStore(settings.max_spans)
    stats = RequestStats()
    slo = SloEngine(slo_config)
    counters = CounterStore()
    arms = ArmStore()
    gauges = GaugeStore()
    replicas = ReplicaClock()
    kv, desired = GaugeHistory("replica_id"), GaugeHistory("model", "fleetserve.model")
    gauges.listeners.update(
        {UPTIME: [replicas.on_uptime], KV_USAGE: [kv.on_point], DESIRED_REPLICAS: [desired.on_point]}
    )
    aliases = {a: (r.small, r.large) for a, r in parse_aliases(settings.model_aliases).items()}
    prices = PriceBook(parse_prices(settings.gpu_prices))
    cost = CostLedger(prices, replicas, aliases)
    quality = QualityStore(recent=settings.quality_recent_requests)
    servicer = MetricsServicer(spans, stats, counters, slo, cost, arms, quality)
    intake = SpanIntake(spans)
    intake.record_sinks += [stats.add, slo.add, cost.add, quality.add_record]
    intake.on_span(ENGINE_SPAN, quality.add_engine_span)
    intake.on_span(FEEDBACK_SPAN, quality.add_feedback_span)
    intake.on_span(ENGINE_SPAN, stats.add_engine_span)
    quality.rating_sinks.append(stats.add_rating)
    arms.attach(intake)
    traces = TraceReceiver(intake)
    metrics = MetricsReceiver(counters, gauges)
    running = await create_server(
        [Service(mpb, "MetricsService", servicer)],
        settings.host,
        settings.port,
        extra=(
            lambda s: otlp_trace_grpc.add_TraceServiceServicer_to_server(traces, s),
            lambda s: otlp_metrics_grpc.add_MetricsServiceServicer_to_server(metrics, s),
        ),
        tls=tls,
    )
    dashboard = None
    if settings.dashboard_port >= 0:
        board = Dashboard(stats, slo, replicas, prices, kv, desired)
        slo.listeners.append(board.on_alerts)
        dashboard = DashboardServer(board, spans)
        await dashboard.start(
            settings.host, settings.dashboard_port, tls.server_ssl_context() if tls is not None else None
        )
    shortest = min(slo_config.scaled(r.short_window_s) for r in slo_config.rules)
    interval = min(settings.slo_eval_interval_s, shortest / 10)
    tasks = [
        asyncio.create_task(evaluate_slos(slo, interval), name="slo-evaluation"),
        # scipy's imports, off the start's path (a fleet waits for this service first) and off the event loop.
        asyncio.create_task(asyncio.to_thread(warm_up), name="scipy-import"),
    ]
    log.info(
        "metrics.configured",
        max_spans=settings.max_spans,
        slos=[s.name for s in slo_config.slos],
        alert_rules=[r.name for r in slo_config.rules],
        slo_time_scale=slo_config.time_scale,
        slo_eval_interval_s=interval,
        dashboard=f"{scheme(tls)}://{dashboard.address}/" if dashboard else None,
    )
    registry = prom.new_registry()
    registry.register(prom.LoopCollector(lambda: intake_families(traces, spans, metrics)))
    return MetricsApp(running, servicer, traces, metrics, tasks, dashboard, registry)

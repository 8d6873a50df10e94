"""OpenTelemetry export: the built-in metrics service and a collector named by the standard OTEL_* variables
side by side (two span processors, two metric readers), exporter failures reported once as one JSON log line,
and a shutdown that never waits on an absent collector for more than about a second."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog
from opentelemetry import context as otel_context
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanContext, TraceFlags

log = structlog.get_logger("fleetserve.telemetry")

# The OTLP exporters' own loggers: a plain-text warning per retry, every few seconds while a collector is
# away. Their messages are kept as the reason in our one line (ExportReporter) and not printed themselves.
EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http._log_exporter",
)


class _LastError(logging.Filter):
    """Keeps each exporting thread's last exporter message (the reason of a failed export) and drops it."""

    def __init__(self) -> None:
        super().__init__()
        self.by_thread: dict[int, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        self.by_thread[threading.get_ident()] = record.getMessage()[:500]
        return False


_LAST_ERROR = _LastError()


def quiet_exporter_loggers() -> None:
    """Route the OTLP exporters' messages into _LAST_ERROR instead of the log (idempotent)."""
    for name in EXPORTER_LOGGERS:
        logger = logging.getLogger(name)
        if _LAST_ERROR not in logger.filters:
            logger.addFilter(_LAST_ERROR)


@dataclass
class ExportReporter:
    """State of one exporter: one `telemetry.export_failed` line when exports start failing, one
    `telemetry.export_recovered` line (with what was lost meanwhile) when they succeed again."""

    destination: str  # "builtin" (the fleet's metrics service) or "external" (OTEL_EXPORTER_OTLP_*)
    signal: str  # "traces" or "metrics"
    endpoint: str
    failing: bool = False
    failed_batches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def outcome(self, ok: bool, items: int) -> None:
        with self.lock:
            if ok and self.failing:
                self.failing = False
                log.info(
                    "telemetry.export_recovered",
                    destination=self.destination,
                    signal=self.signal,
                    endpoint=self.endpoint,
                    failed_batches=self.failed_batches,
                )
                self.failed_batches = 0
            elif not ok:
                self.failed_batches += 1
                if not self.failing:
                    self.failing = True
                    log.warning(
                        "telemetry.export_failed",
                        destination=self.destination,
                        signal=self.signal,
                        endpoint=self.endpoint,
                        items=items,
                        reason=_LAST_ERROR.by_thread.get(threading.get_ident(), ""),
                        note="logged once until exports succeed again",
                    )


class ReportingSpanExporter(SpanExporter):
    """A span exporter whose failures are reported by an ExportReporter (once per outage)."""

    def __init__(self, inner: SpanExporter, reporter: ExportReporter) -> None:
        self.inner, self.reporter = inner, reporter

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception as e:  # noqa: BLE001 - an exporter bug must not kill the batch thread
            _LAST_ERROR.by_thread[threading.get_ident()] = repr(e)
            result = SpanExportResult.FAILURE
        self.reporter.outcome(result == SpanExportResult.SUCCESS, len(spans))
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class ReportingMetricExporter(MetricExporter):
    """A metric exporter whose failures are reported by an ExportReporter (once per outage)."""

    def __init__(self, inner: MetricExporter, reporter: ExportReporter) -> None:
        super().__init__(inner._preferred_temporality, inner._preferred_aggregation)
        self.inner, self.reporter = inner, reporter

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs
    ) -> MetricExportResult:
        try:
            result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception as e:  # noqa: BLE001 - see ReportingSpanExporter
            _LAST_ERROR.by_thread[threading.get_ident()] = repr(e)
            result = MetricExportResult.FAILURE
        points = sum(
            len(m.data.data_points)
            for rm in metrics_data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
        )
        self.reporter.outcome(result == MetricExportResult.SUCCESS, points)
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


# -- the standard variables -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExternalOtlp:
    """Which signals go to a collector named by OTEL_EXPORTER_OTLP_(TRACES_|METRICS_)ENDPOINT, over which
    protocol (OTEL_EXPORTER_OTLP_PROTOCOL: grpc, the default here, or http/protobuf). The exporters read the
    rest of the standard variables themselves (headers, certificates, timeout, compression)."""

    traces: bool
    metrics: bool
    protocol: str

    @classmethod
    def from_env(cls, env: os._Environ | dict = os.environ) -> ExternalOtlp:
        def enabled(signal: str) -> bool:
            if env.get(f"OTEL_{signal.upper()}_EXPORTER", "otlp").strip().lower() == "none":
                return False
            return bool(
                env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
            )

        protocol = env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc").strip().lower() or "grpc"
        if protocol not in ("grpc", "http/protobuf"):
            raise ValueError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: supported are grpc and http/protobuf"
            )
        return cls(enabled("TRACES"), enabled("METRICS"), protocol)

    def span_exporter(self) -> SpanExporter:
        if self.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter()

    def metric_exporter(self) -> MetricExporter:
        if self.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        return OTLPMetricExporter()

    def endpoint(self, signal: str) -> str:
        env = os.environ
        return env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT", ""
        )


def resource(service: str) -> Resource:
    """The process's resource: OTEL_RESOURCE_ATTRIBUTES, with service.name from OTEL_SERVICE_NAME, else from
    those attributes, else fleetserve-<service>."""
    detected = OTELResourceDetector().detect()
    name = (
        os.environ.get("OTEL_SERVICE_NAME")
        or detected.attributes.get("service.name")
        or f"fleetserve-{service}"
    )
    return Resource.create({"service.name": str(name)})


def sampler_from_env() -> Sampler:
    """OTEL_TRACES_SAMPLER (+ _ARG) as the specification names them (default parentbased_always_on)."""
    name = os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    arg = os.environ.get("OTEL_TRACES_SAMPLER_ARG", "")
    try:
        ratio = float(arg) if arg else 1.0
    except ValueError:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={arg!r} is not a number") from None
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={arg!r} must be within [0, 1]")
    samplers = {
        "always_on": lambda: ALWAYS_ON,
        "always_off": lambda: ALWAYS_OFF,
        "traceidratio": lambda: TraceIdRatioBased(ratio),
        "parentbased_always_on": lambda: ParentBased(ALWAYS_ON),
        "parentbased_always_off": lambda: ParentBased(ALWAYS_OFF),
        "parentbased_traceidratio": lambda: ParentBased(TraceIdRatioBased(ratio)),
    }
    if name not in samplers:
        raise ValueError(f"OTEL_TRACES_SAMPLER={name!r}: supported are {', '.join(samplers)}")
    return samplers[name]()


class RecordAll(Sampler):
    """Every span is recorded (the fleet's metrics service needs every request); the configured sampler only
    decides the sampled flag, which the external collector's processor honours and which travels to the next
    hop in traceparent, so a trace is kept or dropped whole."""

    def __init__(self, external: Sampler) -> None:
        self.external = external

    def should_sample(
        self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None
    ):
        result = self.external.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )
        if result.decision == Decision.DROP:
            # A DROP result carries no attributes (the span would not be recorded); the span's own are kept.
            return SamplingResult(
                Decision.RECORD_ONLY, {**(attributes or {}), **(result.attributes or {})}, result.trace_state
            )
        return result

    def get_description(self) -> str:
        return f"RecordAll{{{self.external.get_description()}}}"


class EverySpan(SpanProcessor):
    """Hands every ended span to `inner` (a BatchSpanProcessor, which exports sampled spans only): a span the
    external sampler left unsampled reaches the built-in metrics service as a sampled copy."""

    def __init__(self, inner: SpanProcessor) -> None:
        self.inner = inner

    def on_start(self, span, parent_context: otel_context.Context | None = None) -> None:
        self.inner.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        ctx = span.context
        if ctx is not None and not ctx.trace_flags.sampled:
            span = ReadableSpan(
                name=span.name,
                context=SpanContext(
                    ctx.trace_id, ctx.span_id, ctx.is_remote, TraceFlags(TraceFlags.SAMPLED), ctx.trace_state
                ),
                parent=span.parent,
                resource=span.resource,
                attributes=span.attributes,
                events=span.events,
                links=span.links,
                kind=span.kind,
                instrumentation_scope=span.instrumentation_scope,
                status=span.status,
                start_time=span.start_time,
                end_time=span.end_time,
            )
        self.inner.on_end(span)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def bounded_shutdown(steps: Sequence, exporters: Sequence, timeout_s: float) -> bool:
    """Run the providers' shutdowns (a final flush) for at most timeout_s; then shut the exporters down under
    them, which stops their retries and closes their channels, so a collector that is away (or hangs) never
    holds the process. Returns whether the flush finished in time."""
    done = threading.Event()

    def run() -> None:
        try:
            for step in steps:
                try:
                    step()
                except Exception as e:  # noqa: BLE001 - a failing flush must not stop the others
                    log.warning("telemetry.shutdown_error", error=repr(e))
        finally:
            done.set()

    threading.Thread(target=run, name="telemetry-shutdown", daemon=True).start()
    if done.wait(timeout_s):
        return True
    for exporter in exporters:
        try:
            exporter.shutdown()
        except Exception:  # noqa: BLE001, S110 - already shut down or failing: nothing more to do
            pass
    done.wait(0.2)
    log.warning("telemetry.shutdown_cut", timeout_s=timeout_s, note="telemetry not yet exported was dropped")
    return False

"""Telemetry: structlog JSON logs with trace and request ids, OpenTelemetry tracing and metrics over OTLP,
and W3C trace context carried in gRPC metadata."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import structlog
from grpc import Compression
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared.otel_export import (
    EverySpan,
    ExportReporter,
    ExternalOtlp,
    RecordAll,
    ReportingMetricExporter,
    ReportingSpanExporter,
    bounded_shutdown,
    quiet_exporter_loggers,
    resource,
    sampler_from_env,
)
from shared.tls import Tls

_propagator = TraceContextTextMapPropagator()


def configure_logging(service: str, level: str = "info", json_logs: bool | None = None) -> None:
    """structlog to stderr: JSON off a TTY, with service, trace_id and request_id (bound in contextvars). The
    standard library's loggers (grpc, OpenTelemetry, aiohttp, asyncio) go through the same renderer, so every
    line of a service's log is one JSON object, tracebacks included (as an "exception" field)."""
    if json_logs is None:
        json_logs = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer()
    shared_processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared_processors, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # One write per line (print() writes the line and its newline apart): workers and engine front ends share
        # one log file unbuffered (PYTHONUNBUFFERED), where two writes per line let another process's line in
        # between them.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared_processors, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Libraries log at their own levels; below WARNING they are noise next to our events.
    root.setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))
    structlog.contextvars.clear_contextvars()
    # pid tells the workers of one service apart (shared/workers.py; they share a log file).
    structlog.contextvars.bind_contextvars(service=service, pid=os.getpid())


@dataclass
class Telemetry:
    """The tracer and meter of one service process, and how to flush them at exit."""

    tracer: trace.Tracer
    meter: metrics.Meter
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    # Every exporter (built-in and external), shut down under the providers when a flush overruns.
    exporters: list = field(default_factory=list)

    def shutdown(self, timeout_s: float = 1.0) -> bool:
        """Flush and stop exporters (spans of the last requests included), giving up after timeout_s: a
        collector that is away never delays a service's exit by more than that. True if all was flushed."""
        return bounded_shutdown(
            [
                self.tracer_provider.shutdown,
                lambda: self.meter_provider.shutdown(timeout_millis=timeout_s * 1000),
            ],
            self.exporters,
            timeout_s,
        )


def setup_telemetry(
    service: str, otlp_endpoint: str = "", metrics_interval_s: float = 5.0, tls: Tls | None = None
) -> Telemetry:
    """Tracer and meter providers for a service. Spans and metrics go to the fleet's metrics service at
    otlp_endpoint (over the fleet's TLS when given) AND, at the same time, to a collector named by the standard
    OTEL_EXPORTER_OTLP_* variables (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES and OTEL_TRACES_SAMPLER(_ARG)
    honoured; the sampler decides what the external collector gets, never what the metrics service sees)."""
    quiet_exporter_loggers()
    external = ExternalOtlp.from_env()
    # Without an external collector every span is sampled (the metrics service needs every request, also
    # those whose client sent an unsampled traceparent).
    sampler = RecordAll(sampler_from_env()) if external.traces else ALWAYS_ON
    res = resource(service)
    tracer_provider = TracerProvider(resource=res, sampler=sampler, shutdown_on_exit=False)
    readers, exporters = [], []
    if otlp_endpoint:
        # The built-in exporters get every parameter explicitly, so that no OTEL_EXPORTER_OTLP_* variable meant
        # for the external collector (its headers: often an API key) reaches the metrics service.
        builtin = {
            "endpoint": otlp_endpoint,
            "insecure": tls is None,
            "credentials": tls.channel_credentials() if tls is not None else None,
            "channel_options": tls.channel_options(otlp_endpoint) if tls is not None else None,
            "headers": (("x-fleetserve-service", service),),
            "timeout": 10,
            "compression": Compression.NoCompression,
        }
        span_exporter = ReportingSpanExporter(
            OTLPSpanExporter(**builtin), ExportReporter("builtin", "traces", otlp_endpoint)
        )
        # A short schedule delay so traces reach the collector within a fraction of a second.
        processor = BatchSpanProcessor(span_exporter, schedule_delay_millis=200)
        tracer_provider.add_span_processor(EverySpan(processor) if external.traces else processor)
        metric_exporter = ReportingMetricExporter(
            OTLPMetricExporter(**builtin), ExportReporter("builtin", "metrics", otlp_endpoint)
        )
        readers.append(
            PeriodicExportingMetricReader(
                metric_exporter, export_interval_millis=int(metrics_interval_s * 1000)
            )
        )
        exporters += [span_exporter, metric_exporter]
    if external.traces:
        span_exporter = ReportingSpanExporter(
            external.span_exporter(), ExportReporter("external", "traces", external.endpoint("traces"))
        )
        tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
        exporters.append(span_exporter)
    if external.metrics:
        metric_exporter = ReportingMetricExporter(
            external.metric_exporter(), ExportReporter("external", "metrics", external.endpoint("metrics"))
        )
        # OTEL_METRIC_EXPORT_INTERVAL (default 60 s) applies to the external collector.
        readers.append(PeriodicExportingMetricReader(metric_exporter))
        exporters.append(metric_exporter)
    meter_provider = MeterProvider(resource=res, metric_readers=readers, shutdown_on_exit=False)
    return Telemetry(
        tracer=tracer_provider.get_tracer("fleetserve"),
        meter=meter_provider.get_meter("fleetserve"),
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        exporters=exporters,
    )


class _PresetIds(IdGenerator):
    """The tracer's id generator while a deferred span is built: the ids already sent downstream, once, to the
    thread that builds it; everything else gets fresh ones."""

    def __init__(self, inner: IdGenerator, span_context: trace.SpanContext) -> None:
        self.inner = inner
        self.thread = threading.get_ident()
        self.trace_id: int | None = span_context.trace_id
        self.span_id: int | None = span_context.span_id

    def generate_trace_id(self) -> int:
        trace_id, self.trace_id = self.trace_id, None
        if trace_id is None or threading.get_ident() != self.thread:
            return self.inner.generate_trace_id()
        return trace_id

    def generate_span_id(self) -> int:
        span_id, self.span_id = self.span_id, None
        if span_id is None or threading.get_ident() != self.thread:
            return self.inner.generate_span_id()
        return span_id

    def is_trace_id_random(self) -> bool:
        return self.inner.is_trace_id_random()


class DeferredSpan(trace.Span):
    """A server span whose SDK span is built when it ends (or when something needs more than attributes and
    events): its ids, its sampling decision and its start time are fixed on arrival, so the request's trace
    context goes downstream at once, while building the SDK span (~50 us hot, 100-160 us on a hop that was
    idle: a third of a hop's own Python before its downstream call) waits until the stream is over, off the
    first token's path. Attributes and events set before are kept in order and handed to it then."""

    __slots__ = ("_tracer", "_name", "_parent", "_kind", "_start", "_context", "_recording", "_attrs",
                 "_events", "_span")  # fmt: skip

    def __init__(
        self, tracer, name: str, parent, kind: trace.SpanKind, span_context, recording: bool
    ) -> None:
        self._tracer = tracer
        self._name = name
        self._parent = parent
        self._kind = kind
        self._start = time.time_ns()
        self._context = span_context
        self._recording = recording
        self._attrs: dict = {}
        self._events: list = []
        self._span: trace.Span | None = None

    @classmethod
    def start(cls, tracer, name: str, parent, kind: trace.SpanKind) -> trace.Span | None:
        """A deferred span as tracer.start_span would start it (same ids, flags and trace state), or None when
        tracer is not the SDK's (then the caller starts an ordinary span)."""
        sampler = getattr(tracer, "sampler", None)
        ids = getattr(tracer, "id_generator", None)
        enabled = getattr(tracer, "_is_enabled", None)
        if sampler is None or ids is None or enabled is None or not enabled():
            return None
        parent_context = trace.get_current_span(parent).get_span_context()
        if parent_context is None or not parent_context.is_valid:
            trace_id = ids.generate_trace_id()
            random_trace_id = ids.is_trace_id_random()
            parent_state = None
        else:
            trace_id = parent_context.trace_id
            random_trace_id = parent_context.trace_flags.random_trace_id
            parent_state = parent_context.trace_state
        if sampler is ALWAYS_ON:
            # The services' sampler without an external collector: what its should_sample returns (sampled,
            # recorded, the parent's trace state), without building a SamplingResult on every request's path.
            sampled = recording = True
            trace_state = parent_state
        else:
            result = sampler.should_sample(parent, trace_id, name, kind, None, ())
            sampled, recording = result.decision.is_sampled(), result.decision.is_recording()
            trace_state = result.trace_state
        flags = trace.TraceFlags.SAMPLED if sampled else trace.TraceFlags.DEFAULT
        if random_trace_id:
            flags |= trace.TraceFlags.RANDOM_TRACE_ID
        span_context = trace.SpanContext(
            trace_id,
            ids.generate_span_id(),
            is_remote=False,
            trace_flags=trace.TraceFlags(flags),
            trace_state=trace_state,
        )
        return cls(tracer, name, parent, kind, span_context, recording)

    def _real(self) -> trace.Span:
        span = self._span
        if span is None:
            tracer = self._tracer
            ids = tracer.id_generator
            tracer.id_generator = _PresetIds(ids, self._context)
            try:
                span = tracer.start_span(
                    self._name, context=self._parent, kind=self._kind, start_time=self._start
                )
            finally:
                tracer.id_generator = ids
            self._span = span
            if self._attrs:
                span.set_attributes(self._attrs)
            for name, attributes, timestamp in self._events:
                span.add_event(name, attributes, timestamp)
            self._attrs = self._events = None  # type: ignore[assignment]
        return span

    def get_span_context(self) -> trace.SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._recording if self._span is None else self._span.is_recording()

    def set_attribute(self, key: str, value) -> None:
        if self._span is None:
            self._attrs[key] = value
        else:
            self._span.set_attribute(key, value)

    def set_attributes(self, attributes) -> None:
        if self._span is None:
            self._attrs.update(attributes)
        else:
            self._span.set_attributes(attributes)

    def add_event(self, name: str, attributes=None, timestamp: int | None = None) -> None:
        if self._span is None:
            self._events.append((name, attributes, time.time_ns() if timestamp is None else timestamp))
        else:
            self._span.add_event(name, attributes, timestamp)

    def add_link(self, context, attributes=None) -> None:
        self._real().add_link(context, attributes)

    def update_name(self, name: str) -> None:
        if self._span is None:
            self._name = name
        else:
            self._span.update_name(name)

    def set_status(self, status, description: str | None = None) -> None:
        self._real().set_status(status, description)

    def record_exception(self, exception, attributes=None, timestamp=None, escaped: bool = False) -> None:
        self._real().record_exception(exception, attributes, timestamp, escaped)

    def end(self, end_time: int | None = None) -> None:
        self._real().end(end_time)


@contextlib.contextmanager
def stream_span(
    tracer: trace.Tracer,
    name: str,
    *,
    context: otel_context.Context | None = None,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
) -> Iterator[trace.Span]:
    """tracer.start_as_current_span for the body of an async generator (a streaming servicer). gRPC drops a
    cancelled stream's generator where it stands, and Python closes it later from another task, where the
    context this span was attached in does not exist: OpenTelemetry's own detach then logs an 18-line
    "Failed to detach context" traceback per cancelled stream. Here that case is expected and quiet (there
    is nothing to restore in a task that is not ours); the span still ends and records errors. The span is a
    DeferredSpan: its trace context is current at once, the SDK span is built when it ends."""
    span = DeferredSpan.start(tracer, name, context, kind) or tracer.start_span(
        name, context=context, kind=kind
    )
    token = otel_context.attach(trace.set_span_in_context(span, context))
    try:
        yield span
    except Exception as exc:  # as use_span does: errors, not GeneratorExit or cancellation
        if span.is_recording():
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        span.end()
        if isinstance(token, contextvars.Token):
            with contextlib.suppress(ValueError):  # "created in a different Context": see above
                token.var.reset(token)
        else:  # a runtime context other than contextvars (configured through OTEL_PYTHON_CONTEXT)
            otel_context.detach(token)


_TRACE_KEYS = frozenset(_propagator.fields)
# The traceparent our hops send (version 00, nothing after the flags): parsed and written here directly, ~5x
# faster than the propagator's regex search, getters and setters; anything else goes through the propagator.
_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16


def context_from_metadata(context) -> otel_context.Context:
    """The trace context a caller sent in its gRPC metadata (W3C traceparent)."""
    return trace_context_of(context.invocation_metadata())


def trace_context_of(metadata) -> otel_context.Context:
    """The trace context in a call's metadata pairs: for a handler that reads its metadata once for several
    things (grpc.aio builds the pairs anew on every invocation_metadata() call)."""
    carrier = {k: v for k, v in (metadata or ()) if k in _TRACE_KEYS and isinstance(v, str)}
    if len(carrier) == 1 and (header := carrier.get("traceparent")) is not None:
        m = _TRACEPARENT_00.fullmatch(header)
        if m is not None and m[1] != _ZERO_TRACE_ID and m[2] != _ZERO_SPAN_ID:
            span_context = trace.SpanContext(
                int(m[1], 16), int(m[2], 16), is_remote=True, trace_flags=trace.TraceFlags(int(m[3], 16))
            )
            return trace.set_span_in_context(trace.NonRecordingSpan(span_context), otel_context.Context())
    return _propagator.extract(carrier)


def metadata_for_downstream(extra: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying the current span's trace context to the next hop."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid and not ctx.trace_state:
        return (("traceparent", f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"), *extra)
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return tuple(carrier.items()) + extra


def trace_id_hex(span: trace.Span) -> str:
    """The span's trace id as 32 hex digits (what logs and the metrics service use)."""
    return format(span.get_span_context().trace_id, "032x")


# uuid.uuid4()'s version (4) and variant (RFC 4122) bits, set on 128 random bits.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (4 << 76) | (0x8000 << 48)


def new_request_id() -> str:
    """A new request id: a random version-4 UUID as 32 hex digits, what uuid.uuid4().hex gives, without building
    the UUID object (8 us hot, ~25 on a hop that was idle, at the start of every request's path; this ~3)."""
    return f"{int.from_bytes(os.urandom(16)) & _UUID4_CLEAR | _UUID4_SET:032x}"


def bind_request(request_id: str, span: trace.Span | None = None) -> None:
    """Bind request_id (and the span's trace_id) to every log line of the current task."""
    ids = {"request_id": request_id}
    if span is not None:
        ids["trace_id"] = trace_id_hex(span)
    structlog.contextvars.bind_contextvars(**ids)

"""Standard OpenTelemetry configuration: spans and metrics go to the fleet's metrics service AND to the collector
named by OTEL_EXPORTER_OTLP_ENDPOINT at the same time, with OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES,
OTEL_EXPORTER_OTLP_HEADERS and OTEL_TRACES_SAMPLER(_ARG) honoured (the sampler thins only the external export);
a collector that is away is reported once, as JSON, and never holds a shutdown for more than about a second."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time

import grpc
import pytest
from fleetserve.metrics.v1 import metrics_service_pb2 as mpb
from fleetserve.metrics.v1 import metrics_service_pb2_grpc as mpb_grpc
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from services.metrics.app import start as start_metrics
from services.metrics.config import MetricsSettings
from shared.telemetry import setup_telemetry
from tests.otlp_collector import recording_collector
from tests.support import assert_eventually


@pytest.fixture
def otel_env(monkeypatch):
    """A clean OTEL_* environment with short batch delays (tests set what they need)."""
    import os

    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    return monkeypatch


@contextlib.asynccontextmanager
async def metrics_service():
    app = await start_metrics(MetricsSettings(dashboard_port=-1), setup_telemetry("metrics-test"))
    try:
        async with grpc.aio.insecure_channel(app.address) as ch:
            yield app.address, mpb_grpc.MetricsServiceStub(ch)
    finally:
        await app.stop(0.2)


def root_span(tel, model: str, parent=None) -> str:
    """A gateway root span as the pipeline ends it (a request record for the metrics service); its trace id."""
    span = tel.tracer.start_span(
        "gateway.Generate",
        context=parent,
        kind=trace.SpanKind.SERVER,
        attributes={"fleetserve.model": model, "fleetserve.output_tokens": 3, "rpc.grpc.status_code": 0},
    )
    span.end()
    return format(span.get_span_context().trace_id, "032x")


async def requests_seen(stub, model: str) -> int:
    resp = await stub.Query(mpb.QueryRequest(model=model), timeout=5)
    return sum(m.requests for m in resp.models)


async def test_both_destinations_get_spans_and_metrics_with_the_standard_variables(otel_env):
    """Built-in and external exports run side by side; the external one carries OTEL_SERVICE_NAME, the
    OTEL_RESOURCE_ATTRIBUTES and the OTEL_EXPORTER_OTLP_HEADERS, and those headers (often a vendor's API key)
    never reach the fleet's metrics service."""
    async with metrics_service() as (builtin, stub), recording_collector() as (external, got):
        otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://{external}")
        otel_env.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20vendor-key")
        otel_env.setenv("OTEL_SERVICE_NAME", "acme-gateway")
        otel_env.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=staging,service.namespace=acme")
        tel = setup_telemetry("gateway", otlp_endpoint=builtin, metrics_interval_s=3600)
        try:
            root_span(tel, "m-both")
            tel.meter.create_counter("fleetserve.test.calls").add(1)
            assert await asyncio.to_thread(tel.tracer_provider.force_flush, 10_000)
            assert await asyncio.to_thread(tel.meter_provider.force_flush, 10_000)
            await assert_eventually(lambda: requests_seen(stub, "m-both"), timeout_s=20)
            await assert_eventually(lambda: got.spans and got.metrics, timeout_s=20)
        finally:
            await asyncio.to_thread(tel.shutdown)
    resource, name = got.spans[0]
    assert name == "gateway.Generate"
    assert resource["service.name"] == "acme-gateway"
    assert resource["deployment.environment"] == "staging" and resource["service.namespace"] == "acme"
    assert "fleetserve.test.calls" in {m for _, m in got.metrics}
    assert all(h.get("authorization") == "Bearer vendor-key" for h in got.headers)
    # The built-in exporter names its service in a header of its own and carries no vendor header; checked on
    # the wire by pointing the built-in export at a second recording collector.
    async with recording_collector() as (fake_builtin, seen):
        tel = setup_telemetry("gateway", otlp_endpoint=fake_builtin, metrics_interval_s=3600)
        try:
            root_span(tel, "m-headers")
            assert await asyncio.to_thread(tel.tracer_provider.force_flush, 10_000)
            await assert_eventually(lambda: seen.spans, timeout_s=20)
        finally:
            await asyncio.to_thread(tel.shutdown)
    assert seen.headers and all("authorization" not in h for h in seen.headers)
    assert all(h.get("x-fleetserve-service") == "gateway" for h in seen.headers)


async def test_the_sampler_thins_the_external_export_but_the_metrics_service_sees_every_request(otel_env):
    """OTEL_TRACES_SAMPLER=traceidratio with ratio 0 sends the external collector nothing, while the metrics
    service still gets every request; with parentbased_always_on, a client's unsampled traceparent keeps the
    request away from the external collector and still counted by the metrics service."""
    async with metrics_service() as (builtin, stub), recording_collector() as (external, got):
        otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://{external}")
        otel_env.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
        otel_env.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
        tel = setup_telemetry("gateway", otlp_endpoint=builtin, metrics_interval_s=3600)
        try:
            for _ in range(5):
                root_span(tel, "m-ratio")
            assert await asyncio.to_thread(tel.tracer_provider.force_flush, 10_000)
            await assert_eventually(lambda: _equals(requests_seen(stub, "m-ratio"), 5), timeout_s=20)
        finally:
            await asyncio.to_thread(tel.shutdown)
        assert got.spans == []

        otel_env.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
        tel = setup_telemetry("gateway", otlp_endpoint=builtin, metrics_interval_s=3600)
        try:
            unsampled = trace.set_span_in_context(
                NonRecordingSpan(SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(0)))
            )
            root_span(tel, "m-parent", parent=unsampled)
            root_span(tel, "m-parent")  # no parent: sampled
            assert await asyncio.to_thread(tel.tracer_provider.force_flush, 10_000)
            await assert_eventually(lambda: _equals(requests_seen(stub, "m-parent"), 2), timeout_s=20)
            await assert_eventually(lambda: len(got.spans) == 1, timeout_s=20)
        finally:
            await asyncio.to_thread(tel.shutdown)

        # No external collector at all: a client's unsampled traceparent still counts (the SDK's default sampler
        # would not record that request, and the metrics service would never see it).
        otel_env.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
        otel_env.delenv("OTEL_TRACES_SAMPLER")
        tel = setup_telemetry("gateway", otlp_endpoint=builtin, metrics_interval_s=3600)
        try:
            root_span(tel, "m-unsampled", parent=unsampled)
            assert await asyncio.to_thread(tel.tracer_provider.force_flush, 10_000)
            await assert_eventually(lambda: _equals(requests_seen(stub, "m-unsampled"), 1), timeout_s=20)
        finally:
            await asyncio.to_thread(tel.shutdown)


async def _equals(awaitable, value) -> bool:
    return await awaitable == value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def black_hole():
    """A TCP port that accepts connections and never answers (a collector that hangs)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


async def test_shutdown_gives_up_on_a_hanging_collector_after_its_bound(otel_env):
    """With both collectors hanging and a 30 s exporter timeout, Telemetry.shutdown(1.0) returns having cut the
    flush (False) instead of waiting out the exporters' timeouts."""
    otel_env.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "30")
    with black_hole() as hung_builtin, black_hole() as hung_external:
        otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://{hung_external}")
        tel = setup_telemetry("gateway", otlp_endpoint=hung_builtin, metrics_interval_s=3600)
        root_span(tel, "m-hang")
        tel.meter.create_counter("fleetserve.test.calls").add(1)
        started = time.monotonic()
        flushed = await asyncio.to_thread(tel.shutdown, 1.0)
        took = time.monotonic() - started
    assert flushed is False
    # The bound is 1 s; the exporters alone would wait 30 s. The margin is for a loaded machine.
    assert took < 10, f"shutdown took {took:.1f}s"


def _json_lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    bad = [line for line in lines if not line.startswith("{")]
    assert not bad, f"non-JSON log lines: {bad[:3]}"
    return [json.loads(line) for line in lines]


@contextlib.asynccontextmanager
async def slamming_port():
    """A port where a collector should be that accepts each connection and closes it at once (a collector that
    is away, which also counts how often the exporters tried): (port, attempts as a one-item list)."""
    attempts = [0]

    async def slam(reader, writer):
        attempts[0] += 1
        writer.close()

    server = await asyncio.start_server(slam, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], attempts
    finally:
        server.close()
        await server.wait_closed()


def _start_engine(ready, log_path) -> subprocess.Popen:
    """An engine process (its gauges are exported on every interval, busy or not) logging to log_path, with
    this test's environment."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.engine",
                "--registry-address",
                "",
                "--startup-s",
                "0",
                "--log-json",
                "--ready-file",
                str(ready),
                "--metrics-port",
                "-1",
                "--grace-period-s",
                "0.5",
            ],
            stdout=log,
            stderr=log,
        )


async def test_a_service_reports_an_absent_collector_once_and_its_recovery(otel_env, tmp_path):
    """A real service process exporting to an external collector that is away tries again and again but logs
    ONE JSON line telemetry.export_failed (not a line per retry), then one telemetry.export_recovered when the
    collector comes up, and still exits cleanly on SIGTERM."""
    otel_env.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
    otel_env.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    otel_env.setenv(
        "OTEL_TRACES_EXPORTER", "none"
    )  # metrics alone: the engine exports its gauges periodically
    ready = tmp_path / "ready.json"
    log_path = tmp_path / "engine.log"
    async with slamming_port() as (port, attempts):
        otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        proc = _start_engine(ready, log_path)
        try:
            await assert_eventually(ready.exists, timeout_s=60)
            await assert_eventually(
                lambda: attempts[0] >= 6, timeout_s=60, message="the exporter never retried"
            )
        except BaseException:
            proc.kill()
            proc.wait(10)
            raise
    try:
        async with recording_collector(port) as (_, got):
            recovered = lambda: [  # noqa: E731
                e for e in _json_lines(log_path.read_text()) if e["event"] == "telemetry.export_recovered"
            ]
            (line,) = await assert_eventually(recovered, timeout_s=60)
            assert got.metrics
        events = _json_lines(log_path.read_text())
        fails = [e for e in events if e["event"] == "telemetry.export_failed"]
        assert len(fails) == 1, fails
        assert fails[0]["destination"] == "external" and fails[0]["signal"] == "metrics"
        assert fails[0]["reason"], "the line says why"
        assert line["failed_batches"] >= 2
        proc.terminate()
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

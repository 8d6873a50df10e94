"""Telemetry: a streaming servicer's span survives being finalized from another task without a traceback, and
every log line, the standard library's included, is one JSON object."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import textwrap
import uuid

from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.telemetry import new_request_id, stream_span


def _tracer():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


async def test_stream_span_finalized_from_another_task_logs_nothing_and_ends(caplog):
    """A generator suspended inside stream_span and dropped (as gRPC drops a cancelled stream's generator) is
    closed by Python from another task: no 'Failed to detach context', and the span is ended."""
    tracer, exporter = _tracer()

    async def servicer():
        with stream_span(tracer, "s.Generate"):
            for i in range(10):
                yield i

    async def consume_one():
        gen = servicer()
        assert await anext(gen) == 0
        # the task ends with gen suspended at its yield; dropping it hands it to the loop's finalizer

    await asyncio.create_task(consume_one())
    gc.collect()
    for _ in range(5):  # the finalizer's aclose() runs as a task of its own
        await asyncio.sleep(0)
    assert [s.name for s in exporter.get_finished_spans()] == ["s.Generate"]
    assert not [r for r in caplog.records if "detach" in r.getMessage()]


async def test_stream_span_records_errors_and_restores_the_context():
    """An exception inside the span marks it ERROR; afterwards the caller's context is current again."""
    from opentelemetry import trace

    tracer, exporter = _tracer()
    before = trace.get_current_span()
    try:
        with stream_span(tracer, "s.Fail"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code.name == "ERROR"
    assert trace.get_current_span() is before


def test_standard_library_logs_are_json_lines():
    """After configure_logging, a stdlib logger's record with a traceback is one JSON line with the service
    name and the traceback in "exception"; structlog's own events too."""
    code = textwrap.dedent(
        """
        import logging, structlog
        from shared.telemetry import configure_logging
        configure_logging("svc", "info", json_logs=True)
        structlog.get_logger("x").info("svc.event", n=1)
        try:
            raise ValueError("bad")
        except ValueError:
            logging.getLogger("opentelemetry.context").exception("Failed to detach context")
        logging.getLogger("grpc").info("below warning: dropped")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    lines = out.stderr.strip().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["event"] for r in records] == ["svc.event", "Failed to detach context"]
    assert all(r["service"] == "svc" for r in records)
    assert "ValueError: bad" in records[1]["exception"]
    assert records[1]["logger"] == "opentelemetry.context" and records[1]["level"] == "error"


def test_processes_sharing_one_unbuffered_log_file_never_merge_lines(tmp_path):
    """Workers and engine front ends write one log file, unbuffered (the launcher sets PYTHONUNBUFFERED): each
    line must be one write, or another process's line lands between a line and its newline."""
    code = textwrap.dedent(
        """
        import structlog
        from shared.telemetry import configure_logging
        configure_logging("svc", "info", json_logs=True)
        log = structlog.get_logger("x")
        for i in range(3000):
            log.info("svc.event", i=i, pad="x" * 200)
        """
    )
    log_file = tmp_path / "shared.log"
    env = {**__import__("os").environ, "PYTHONUNBUFFERED": "1"}
    with open(log_file, "ab") as out:
        procs = [subprocess.Popen([sys.executable, "-c", code], stderr=out, env=env) for _ in range(4)]
        for p in procs:
            assert p.wait(timeout=120) == 0
    lines = log_file.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 4 * 3000
    assert {r["pid"] for r in records} == {p.pid for p in procs}


class _Ended(SpanProcessor):
    """Every span that ends, sampled or not (an exporter gets only sampled ones)."""

    def __init__(self) -> None:
        self.spans = []

    def on_end(self, span) -> None:
        self.spans.append(span)

    def get_finished_spans(self):
        return self.spans


def _sampled_tracer(sampler):
    ended = _Ended()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(ended)
    return provider.get_tracer("test"), ended


class _Meta:
    def __init__(self, *pairs) -> None:
        self.pairs = pairs

    def invocation_metadata(self):
        return self.pairs


def test_stream_span_sends_the_ids_its_span_is_exported_with():
    """The trace context that goes downstream while the span is open names the span that is exported when it
    ends (ids, flags, trace state), under every sampler we configure; it starts when the stream started, keeps
    attributes and events set before it was built, and its parent is the caller's span."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

    from shared.otel_export import RecordAll
    from shared.telemetry import context_from_metadata, metadata_for_downstream

    samplers = [ALWAYS_ON, RecordAll(ParentBased(TraceIdRatioBased(0.5))), RecordAll(ParentBased(ALWAYS_ON))]
    parents = [
        (),
        (("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),),
        (("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"),),
        (
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ("tracestate", "vendor=value"),
        ),
    ]
    for sampler in samplers:
        for parent in parents:
            for _ in range(8):  # ratio samplers: trace ids on both sides of the ratio
                tracer, exporter = _sampled_tracer(sampler)
                caller = context_from_metadata(_Meta(*parent))
                with stream_span(tracer, "s.Generate", context=caller, kind=trace.SpanKind.SERVER) as span:
                    started = span.get_span_context()
                    sent = dict(metadata_for_downstream())
                    span.set_attribute("a", 1)
                    span.add_event("e", {"k": "v"})
                    span.set_attributes({"b": "x"})
                (done,) = exporter.get_finished_spans()
                assert done.context == started
                expected = {}
                from shared.telemetry import _propagator

                _propagator.inject(expected, trace.set_span_in_context(trace.NonRecordingSpan(done.context)))
                assert sent == expected
                parent_ctx = trace.get_current_span(caller).get_span_context()
                assert done.parent == (parent_ctx if parent_ctx.is_valid else None)
                if parent:
                    assert done.context.trace_id == parent_ctx.trace_id
                assert dict(done.attributes) == {"a": 1, "b": "x"}
                assert [(e.name, dict(e.attributes)) for e in done.events] == [("e", {"k": "v"})]
                assert done.start_time <= done.events[0].timestamp <= done.end_time


def test_trace_context_parsed_as_the_propagator_parses_it():
    """context_from_metadata reads a traceparent (and anything unusual: tracestate, a bad or unknown version,
    zero ids, spaces) exactly as OpenTelemetry's W3C propagator does."""
    from opentelemetry import trace

    from shared.telemetry import _propagator, context_from_metadata

    tid, sid = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    headers = [
        f"00-{tid}-{sid}-01",
        f"00-{tid}-{sid}-00",
        f"00-{tid}-{sid}-03",
        f"01-{tid}-{sid}-01",
        f"ff-{tid}-{sid}-01",
        f"00-{tid}-{sid}-01-extra",
        f" 00-{tid}-{sid}-01",
        f"00-{'0' * 32}-{sid}-01",
        f"00-{tid}-{'0' * 16}-01",
        f"00-{tid.upper()}-{sid}-01",
        "garbage",
        "",
    ]
    for header in headers:
        for extra in ((), (("tracestate", "a=b"),), (("authorization", "Bearer x"),)):
            got = trace.get_current_span(context_from_metadata(_Meta(("traceparent", header), *extra)))
            want = trace.get_current_span(_propagator.extract({"traceparent": header, **dict(extra)}))
            assert got.get_span_context() == want.get_span_context(), (header, extra)
    assert not trace.get_current_span(context_from_metadata(_Meta())).get_span_context().is_valid


def test_request_ids_are_random_version_4_uuids_in_hex():
    """new_request_id() has uuid.uuid4().hex's form, and every one of a UUID4's 122 random bits varies."""
    ids = [new_request_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    seen_set = seen_clear = 0
    for rid in ids:
        u = uuid.UUID(hex=rid)
        assert u.hex == rid and u.version == 4 and u.variant == uuid.RFC_4122
        seen_set |= u.int
        seen_clear |= ~u.int & ((1 << 128) - 1)
    fixed = (0xF000 << 64) | (0xC000 << 48)
    assert seen_set & seen_clear == ((1 << 128) - 1) & ~fixed

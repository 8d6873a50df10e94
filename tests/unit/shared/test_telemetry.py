"""Telemetry: a streaming servicer's span survives being finalized from another task without a traceback, and
every log line, the standard library's included, is one JSON object."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import textwrap

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.telemetry import stream_span


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

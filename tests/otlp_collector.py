"""A recording OTLP/gRPC collector for tests: what an external OpenTelemetry collector receives (spans with their
resources, metric names, and each export's request headers). No collector binary is packaged for Debian or
PyPI; this serves the standard OTLP TraceService and MetricsService on a free loopback port."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as mpb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as mgrpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tpb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tgrpc


def _attrs(resource) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in resource.attributes}


@dataclass
class Received:
    """Everything the collector was sent."""

    spans: list[tuple[dict[str, str], str]] = field(default_factory=list)  # (resource attributes, span name)
    metrics: list[tuple[dict[str, str], str]] = field(default_factory=list)  # (resource attributes, metric)
    headers: list[dict[str, str]] = field(default_factory=list)  # per export call

    def services(self) -> set[str]:
        return {r.get("service.name", "") for r, _ in self.spans}


class _Traces(tgrpc.TraceServiceServicer):
    def __init__(self, got: Received) -> None:
        self.got = got

    async def Export(self, request: tpb.ExportTraceServiceRequest, context):  # noqa: N802 - gRPC name
        self.got.headers.append(dict(context.invocation_metadata() or ()))
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                self.got.spans += [(_attrs(rs.resource), s.name) for s in ss.spans]
        return tpb.ExportTraceServiceResponse()


class _Metrics(mgrpc.MetricsServiceServicer):
    def __init__(self, got: Received) -> None:
        self.got = got

    async def Export(self, request: mpb.ExportMetricsServiceRequest, context):  # noqa: N802 - gRPC name
        self.got.headers.append(dict(context.invocation_metadata() or ()))
        for rm in request.resource_metrics:
            for sm in rm.scope_metrics:
                self.got.metrics += [(_attrs(rm.resource), m.name) for m in sm.metrics]
        return mpb.ExportMetricsServiceResponse()


@contextlib.asynccontextmanager
async def recording_collector(port: int = 0):
    """(address, Received) of a collector on 127.0.0.1:port (0: a free one), stopped when the block ends."""
    got = Received()
    server = grpc.aio.server()
    tgrpc.add_TraceServiceServicer_to_server(_Traces(got), server)
    mgrpc.add_MetricsServiceServicer_to_server(_Metrics(got), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield f"127.0.0.1:{bound}", got
    finally:
        await server.stop(0)

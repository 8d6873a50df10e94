"""Reading OTLP protobufs: attribute values as Python values and as strings, resource service names."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from fleetserve.metrics.v1 import metrics_service_pb2 as mpb
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2


def value_of(v: common_pb2.AnyValue) -> Any:
    """The Python value of an OTLP AnyValue (None when empty)."""
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value_of(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attributes_of(v.kvlist_value.values)
    return getattr(v, kind)


def attributes_of(kvs: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    """OTLP key-values as a dict of Python values."""
    return {kv.key: value_of(kv.value) for kv in kvs}


def to_str(value: Any) -> str:
    """A value's string form: strings as they are, booleans as OTel writes them, bytes as hex, lists and
    maps as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list | dict):
        return json.dumps(value, default=lambda x: x.hex() if isinstance(x, bytes) else str(x))
    if value is None:
        return ""
    return str(value)


def service_name(resource: resource_pb2.Resource) -> str:
    """service.name of a resource ("" if it has none)."""
    for kv in resource.attributes:
        if kv.key == "service.name":
            return to_str(value_of(kv.value))
    return ""


def flatten_span(span: trace_pb2.Span, service: str, attrs: dict[str, Any]) -> mpb.Span:
    """One OTLP span as the flat fleetserve.metrics.v1.Span (hex ids, string attributes)."""
    return mpb.Span(
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex(),
        name=span.name,
        service_name=service,
        start_unix_nano=span.start_time_unix_nano,
        end_unix_nano=span.end_time_unix_nano,
        status_code=span.status.code,
        attributes={k: to_str(v) for k, v in attrs.items()},
    )


def number_points(request, data: str) -> Iterator[tuple[str, Any, dict[str, str], int, float]]:
    """(service.name, metric, string attributes, time in Unix ns, value) of every number data point of the
    metrics of one kind ("sum" or "gauge") in an ExportMetricsServiceRequest; points without a value are skipped."""
    for rm in request.resource_metrics:
        service = service_name(rm.resource)
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.WhichOneof("data") != data:
                    continue
                for dp in getattr(metric, data).data_points:
                    kind = dp.WhichOneof("value")
                    if kind is not None:
                        attrs = {k: to_str(v) for k, v in attributes_of(dp.attributes).items()}
                        yield service, metric, attrs, dp.time_unix_nano, float(getattr(dp, kind))

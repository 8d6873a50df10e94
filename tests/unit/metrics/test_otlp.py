"""OTLP reading: attribute values to Python and to strings, service names, flattened spans."""

from __future__ import annotations

from opentelemetry.proto.common.v1 import common_pb2 as c
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from services.metrics.otlp import attributes_of, flatten_span, service_name, to_str


def kv(key: str, **value) -> c.KeyValue:
    return c.KeyValue(key=key, value=c.AnyValue(**value))


def test_values_and_their_string_forms():
    """Each AnyValue kind has a Python value and a string form (bools as OTel writes them, lists as JSON)."""
    attrs = attributes_of(
        [
            kv("s", string_value="x"),
            kv("i", int_value=3),
            kv("d", double_value=1.5),
            kv("b", bool_value=True),
            kv("a", array_value=c.ArrayValue(values=[c.AnyValue(int_value=1), c.AnyValue(string_value="y")])),
            kv("y", bytes_value=b"\x01\xff"),
            kv("e"),
        ]
    )
    assert attrs == {"s": "x", "i": 3, "d": 1.5, "b": True, "a": [1, "y"], "y": b"\x01\xff", "e": None}
    assert {k: to_str(v) for k, v in attrs.items()} == {
        "s": "x",
        "i": "3",
        "d": "1.5",
        "b": "true",
        "a": '[1, "y"]',
        "y": "01ff",
        "e": "",
    }


def test_service_name_and_flattened_span():
    """A span flattens to hex ids (empty parent for a root), its resource's service.name and string attributes."""
    resource = resource_pb2.Resource(attributes=[kv("service.name", string_value="fleetserve-gateway")])
    assert service_name(resource) == "fleetserve-gateway"
    assert service_name(resource_pb2.Resource()) == ""
    span = trace_pb2.Span(
        trace_id=bytes(range(16)),
        span_id=bytes(range(8)),
        name="gateway.Generate",
        start_time_unix_nano=5,
        end_time_unix_nano=9,
        status=trace_pb2.Status(code=2),
    )
    flat = flatten_span(span, "svc", {"n": 2})
    assert flat.trace_id == bytes(range(16)).hex() and flat.span_id == "0001020304050607"
    assert flat.parent_span_id == ""
    assert (flat.service_name, flat.start_unix_nano, flat.end_unix_nano, flat.status_code) == ("svc", 5, 9, 2)
    assert dict(flat.attributes) == {"n": "2"}

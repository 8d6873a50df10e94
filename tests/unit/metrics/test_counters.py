"""Counter totals from OTLP Sum points: latest cumulative value per series, deltas added, summed by name."""

from __future__ import annotations

from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as svc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2 as m
from opentelemetry.proto.resource.v1 import resource_pb2

from services.metrics.counters import CounterStore

CUMULATIVE = m.AGGREGATION_TEMPORALITY_CUMULATIVE
DELTA = m.AGGREGATION_TEMPORALITY_DELTA


def export(
    service: str, name: str, points: list[tuple[dict, int, float]], temporality=CUMULATIVE, gauge=False
):
    """An ExportMetricsServiceRequest with one metric of (attributes, time, value) points."""
    dps = [
        m.NumberDataPoint(
            attributes=[
                common_pb2.KeyValue(key=k, value=common_pb2.AnyValue(string_value=v)) for k, v in a.items()
            ],
            time_unix_nano=t,
            **({"as_int": int(v)} if float(v).is_integer() else {"as_double": v}),
        )
        for a, t, v in points
    ]
    metric = m.Metric(name=name)
    if gauge:
        metric.gauge.data_points.extend(dps)
    else:
        metric.sum.data_points.extend(dps)
        metric.sum.aggregation_temporality = temporality
        metric.sum.is_monotonic = True
    resource = resource_pb2.Resource(
        attributes=[common_pb2.KeyValue(key="service.name", value=common_pb2.AnyValue(string_value=service))]
    )
    return svc.ExportMetricsServiceRequest(
        resource_metrics=[
            m.ResourceMetrics(resource=resource, scope_metrics=[m.ScopeMetrics(metrics=[metric])])
        ]
    )


def test_cumulative_points_replace_and_series_sum():
    """Each series keeps its latest cumulative value; the total sums series over attributes and services."""
    c = CounterStore()
    c.ingest(export("gw", "reqs", [({"code": "OK"}, 1, 5), ({"code": "ERR"}, 1, 1)]))
    c.ingest(export("gw", "reqs", [({"code": "OK"}, 2, 7)]))
    c.ingest(export("gw2", "reqs", [({"code": "OK"}, 2, 10)]))
    assert c.totals() == {"reqs": 18.0}


def test_late_older_cumulative_point_is_ignored():
    """A cumulative point older than the one kept does not roll the total back."""
    c = CounterStore()
    c.ingest(export("gw", "reqs", [({}, 20, 9)]))
    c.ingest(export("gw", "reqs", [({}, 10, 4)]))
    assert c.totals() == {"reqs": 9.0}


def test_delta_points_add_up():
    """Delta points add to the series."""
    c = CounterStore()
    c.ingest(export("gw", "tokens", [({}, 1, 2.5)], temporality=DELTA))
    c.ingest(export("gw", "tokens", [({}, 2, 1.5)], temporality=DELTA))
    assert c.totals() == {"tokens": 4.0}


def test_gauges_are_not_counters():
    """Only Sum metrics become counters."""
    c = CounterStore()
    assert c.ingest(export("gw", "queue", [({}, 1, 3)], gauge=True)) == 0
    assert c.totals() == {}


def test_series_are_bounded():
    """Past max_series, points of new series are dropped; existing series still update."""
    c = CounterStore(max_series=2)
    c.ingest(export("gw", "x", [({"i": "1"}, 1, 1), ({"i": "2"}, 1, 1), ({"i": "3"}, 1, 1)]))
    c.ingest(export("gw", "x", [({"i": "1"}, 2, 5)]))
    assert c.totals() == {"x": 6.0}
    assert c.dropped_points == 1

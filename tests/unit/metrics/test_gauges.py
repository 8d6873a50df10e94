"""Gauges from OTLP: the latest point per series, listeners per metric, and the replica clock built from the
engines' uptime gauge (start = point time - uptime; a restart under the same id is a new interval)."""

from __future__ import annotations

import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as svc
from opentelemetry.proto.common.v1 import common_pb2

from services.metrics.gauges import UPTIME, GaugeHistory, GaugeStore, ReplicaClock


def export(name: str, points: list[tuple[dict, float, float]]) -> svc.ExportMetricsServiceRequest:
    req = svc.ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.add(
        key="service.name", value=common_pb2.AnyValue(string_value="fleetserve-engine")
    )
    metric = rm.scope_metrics.add().metrics.add(name=name)
    for attrs, t, v in points:
        dp = metric.gauge.data_points.add(time_unix_nano=int(t * 1e9), as_double=v)
        for k, val in attrs.items():
            dp.attributes.add(key=k, value=common_pb2.AnyValue(string_value=val))
    return req


def test_latest_value_per_series_and_listeners():
    """The newest point of each series is kept (a late older one is ignored); listeners see every point."""
    store = GaugeStore()
    seen = []
    store.listeners["g"] = [lambda a, t, v: seen.append((a["r"], t, v))]
    assert (
        store.ingest(export("g", [({"r": "a"}, 10.0, 1.0), ({"r": "a"}, 5.0, 9.0), ({"r": "b"}, 10.0, 2.0)]))
        == 3
    )
    assert sorted((a["r"], v) for a, _, v in store.latest("g")) == [("a", 1.0), ("b", 2.0)]
    assert len(seen) == 3
    assert store.latest("g", since=11.0) == []


def test_replica_clock_intervals_and_restarts():
    """Uptime points give each run's start and last sighting; a restart (start moves) opens a new interval."""
    clock = ReplicaClock()
    attrs = {"replica_id": "e1", "replica_type": "h100-llama-1b", "model": "m"}
    for t in (110.0, 150.0, 200.0):
        clock.on_uptime(attrs, t, t - 100.0)  # up since 100
    clock.on_uptime(attrs, 400.0, 50.0)  # restarted at 350
    r = clock.replicas["e1"]
    assert r.intervals == [[100.0, 200.0], [350.0, 400.0]]
    assert r.seconds_in(0.0, 1000.0) == pytest.approx(150.0)
    assert r.seconds_in(150.0, 375.0) == pytest.approx(75.0)
    assert r.up_at(199.0) and not r.up_at(300.0) and r.up_at(205.0, slack_s=10.0)
    store = GaugeStore()
    store.listeners[UPTIME] = [clock.on_uptime]
    store.ingest(export(UPTIME, [({"replica_id": "e2", "replica_type": "l4-llama-1b"}, 500.0, 20.0)]))
    assert (
        clock.replicas["e2"].intervals == [[480.0, 500.0]]
        and clock.replicas["e2"].replica_type == "l4-llama-1b"
    )


def test_history_keys_by_the_first_label_present():
    """History per series: the autoscaler's gauge says fleetserve.model, others model."""
    h = GaugeHistory("model", "fleetserve.model", max_points=2)
    for t in (1.0, 2.0, 3.0):
        h.on_point({"fleetserve.model": "m"}, t, t)
    h.on_point({"model": "n"}, 1.0, 5.0)
    assert h.since(0.0) == {"m": [(2.0, 2.0), (3.0, 3.0)], "n": [(1.0, 5.0)]}

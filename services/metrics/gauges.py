"""Gauges from OTLP Gauge metrics (latest value per series), and the replicas' up time read from the engines'
fleetserve.engine.uptime gauge: when each replica ran, which cost attribution prices."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from services.metrics.otlp import number_points

log = structlog.get_logger(__name__)

UPTIME = "fleetserve.engine.uptime"
KV_USAGE = "fleetserve.engine.kv_cache_usage"
DESIRED_REPLICAS = "fleetserve.autoscaler.desired_replicas"
# Points of history kept per series for the dashboard (an hour at the default 5 s export interval).
HISTORY_POINTS = 720
# Same bound as counters: a bug that puts a request id in an attribute must not grow the collector.
MAX_SERIES = 100_000
# A replica restarted under the same id shows an uptime that starts again: a new interval when its start
# moved by more than this.
RESTART_SLACK_S = 2.0
MAX_INTERVALS_PER_REPLICA = 1000

Point = Callable[[dict[str, str], float, float], None]


class GaugeStore:
    """The latest (time, value) of every gauge series (service.name, metric, attributes); listeners per metric
    name see every point as it arrives."""

    def __init__(self, max_series: int = MAX_SERIES) -> None:
        self.max_series = max_series
        self._series: dict[tuple[str, str, frozenset[tuple[str, str]]], tuple[float, float]] = {}
        self.listeners: dict[str, list[Point]] = {}
        self.dropped_points = 0

    def ingest(self, request) -> int:
        """Take the Gauge metrics of an ExportMetricsServiceRequest; how many data points were read."""
        n = 0
        for service, metric, attrs, t_ns, value in number_points(request, "gauge"):
            self.add(service, metric.name, attrs, t_ns / 1e9, value)
            n += 1
        return n

    def add(self, service: str, name: str, attrs: dict[str, str], t: float, value: float) -> None:
        key = (service, name, frozenset(attrs.items()))
        old = self._series.get(key)
        if old is None and len(self._series) >= self.max_series:
            self.dropped_points += 1
            if self.dropped_points == 1:
                log.warning("metrics.too_many_gauge_series", max_series=self.max_series, metric=name)
            return
        if old is None or t >= old[0]:
            self._series[key] = (t, value)
        for listener in self.listeners.get(name, ()):
            listener(attrs, t, value)

    def latest(self, name: str, since: float = 0.0) -> list[tuple[dict[str, str], float, float]]:
        """(attributes, time, value) of every series of a metric last seen at or after `since`."""
        return [
            (dict(attrs), t, v) for (_, n, attrs), (t, v) in self._series.items() if n == name and t >= since
        ]


@dataclass
class Replica:
    """One engine replica as its uptime gauge describes it."""

    replica_id: str
    replica_type: str
    model: str
    version: str
    # (start, last seen) Unix seconds of each run of the replica under this id.
    intervals: list[list[float]] = field(default_factory=list)

    def seconds_in(self, start: float, end: float) -> float:
        """Seconds it was up within [start, end]."""
        return sum(max(0.0, min(end, b) - max(start, a)) for a, b in self.intervals)

    def up_at(self, t: float, slack_s: float = 0.0) -> bool:
        """Whether it was up at t (slack: how long after its last point it still counts as up)."""
        return any(a <= t <= b + slack_s for a, b in self.intervals)


class ReplicaClock:
    """When each replica was up: from each uptime point, start = point time - uptime, and the run lasts at least
    until the latest point (an engine exports a last point when it shuts down)."""

    def __init__(self) -> None:
        self.replicas: dict[str, Replica] = {}

    def on_uptime(self, attrs: dict[str, str], t: float, uptime_s: float) -> None:
        rid = attrs.get("replica_id", "")
        if not rid or uptime_s < 0:
            return
        r = self.replicas.get(rid)
        if r is None:
            if len(self.replicas) >= MAX_SERIES:
                return
            r = self.replicas[rid] = Replica(
                rid, attrs.get("replica_type", ""), attrs.get("model", ""), attrs.get("model_version", "")
            )
        start = t - uptime_s
        for iv in r.intervals:
            if abs(iv[0] - start) <= RESTART_SLACK_S:
                iv[1] = max(iv[1], t)
                return
        r.intervals.append([start, t])
        r.intervals.sort()
        del r.intervals[:-MAX_INTERVALS_PER_REPLICA]


class GaugeHistory:
    """The recent points of one gauge, per value of one attribute (KV-cache use per replica, desired replicas
    per model), for the dashboard's charts."""

    def __init__(self, *labels: str, max_points: int = HISTORY_POINTS, max_series: int = 1024) -> None:
        # The series key: the first of these attributes a point has (exporters spell "model" differently).
        self.labels = labels
        self.max_points = max_points
        self.max_series = max_series
        self.series: dict[str, deque[tuple[float, float]]] = {}

    def on_point(self, attrs: dict[str, str], t: float, value: float) -> None:
        key = next((attrs[k] for k in self.labels if k in attrs), "")
        points = self.series.get(key)
        if points is None:
            if len(self.series) >= self.max_series:
                return
            points = self.series[key] = deque(maxlen=self.max_points)
        points.append((t, value))

    def since(self, start: float) -> dict[str, list[tuple[float, float]]]:
        return {k: [p for p in pts if p[0] >= start] for k, pts in sorted(self.series.items())}

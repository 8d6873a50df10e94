"""Counters from OTLP Sum metrics: the latest value of every series, summed by metric name."""

from __future__ import annotations

import structlog
from opentelemetry.proto.metrics.v1 import metrics_pb2 as otlp_metrics

from services.metrics.otlp import number_points

log = structlog.get_logger(__name__)

DELTA = otlp_metrics.AGGREGATION_TEMPORALITY_DELTA
# Attribute sets come from the services' own code, but a bug there (a request id as an attribute) must not
# grow the collector without bound.
MAX_SERIES = 100_000

SeriesKey = tuple[str, str, frozenset[tuple[str, str]]]


class CounterStore:
    """One value per series (service.name, metric name, attribute set). A cumulative point replaces the
    series' value (each exporter resends its running total); a delta point adds to it."""

    def __init__(self, max_series: int = MAX_SERIES) -> None:
        self.max_series = max_series
        # series -> (time of the point, value)
        self._series: dict[SeriesKey, tuple[int, float]] = {}
        self.dropped_points = 0

    def __len__(self) -> int:
        return len(self._series)

    def add_point(self, key: SeriesKey, time_unix_nano: int, value: float, delta: bool = False) -> None:
        old = self._series.get(key)
        if old is None:
            if len(self._series) >= self.max_series:
                self.dropped_points += 1
                if self.dropped_points == 1:
                    log.warning("metrics.too_many_series", max_series=self.max_series, metric=key[1])
                return
            self._series[key] = (time_unix_nano, value)
        elif delta:
            self._series[key] = (max(old[0], time_unix_nano), old[1] + value)
        elif time_unix_nano >= old[0]:  # a late, older cumulative point must not roll the total back
            self._series[key] = (time_unix_nano, value)

    def ingest(self, request) -> int:
        """Take the Sum metrics of an ExportMetricsServiceRequest; how many data points were read."""
        n = 0
        for service, metric, attrs, t_ns, value in number_points(request, "sum"):
            delta = metric.sum.aggregation_temporality == DELTA
            self.add_point((service, metric.name, frozenset(attrs.items())), t_ns, value, delta)
            n += 1
        return n

    def totals(self) -> dict[str, float]:
        """Metric name -> the sum of its series (over services and attributes)."""
        out: dict[str, float] = {}
        for (_, name, _), (_, value) in self._series.items():
            out[name] = out.get(name, 0.0) + value
        return dict(sorted(out.items()))

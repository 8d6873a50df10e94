"""The live dashboard's data: one JSON document per refresh, built from the collector's stores (latency buckets,
replica clock, gauge histories, SLO alerts), with every series on the latency buckets' time grid."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from fleetserve.metrics.v1 import metrics_service_pb2 as mpb
from google.protobuf.json_format import MessageToDict

from services.metrics.cost import PriceBook
from services.metrics.gauges import GaugeHistory, ReplicaClock
from services.metrics.latency import RequestStats, SeriesPoint
from services.metrics.sketches import summarize
from services.metrics.slo import SloEngine

# Alert changes kept for the dashboard's list.
ALERT_LOG = 50
SLOWEST = 10


def _latency(sketch) -> dict[str, float | None]:
    s = summarize(sketch)
    if not s.count:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    return {"p50": s.p50, "p95": s.p95, "p99": s.p99, "mean": s.mean}


def _last_at(points: deque | list, t: float, max_age_s: float) -> float | None:
    """The value of the last point at or before t, if it is at most max_age_s old (a replica that left stops
    being drawn); None otherwise."""
    value, at = None, None
    for pt, v in points:
        if pt > t:
            break
        value, at = v, pt
    return value if at is not None and t - at <= max_age_s else None


@dataclass
class Dashboard:
    """Everything the page shows, read from the stores the collector already keeps."""

    stats: RequestStats
    slo: SloEngine
    replicas: ReplicaClock
    prices: PriceBook
    kv: GaugeHistory
    desired: GaugeHistory
    # How long after its last uptime point a replica still counts as up (a few export intervals).
    up_slack_s: float = 15.0
    alert_log: deque = field(default_factory=lambda: deque(maxlen=ALERT_LOG))

    def on_alerts(self, alerts: list[mpb.Alert]) -> None:
        """SloEngine listener: remember fired and resolved alerts for the page."""
        self.alert_log.extend(_alert_dict(a) for a in alerts)

    def document(self, window_s: float, now: float, model: str = "") -> dict[str, Any]:
        points = self.stats.series(model, window_s, now)
        grid = [p.t + p.width_s for p in points]  # each point is drawn at its bucket's end
        doc: dict[str, Any] = {
            "now": now,
            "window_s": window_s,
            "model": model,
            "models": self.stats.models(),
            "t": grid,
            "ttft_ms": self._percentile_series(points, "ttft"),
            "tpot_ms": self._percentile_series(points, "tpot"),
            "requests_per_s": [p.bucket.requests / p.width_s for p in points],
            "output_tokens_per_s": [p.bucket.output_tokens / p.width_s for p in points],
            "error_rate": [p.bucket.errors / p.bucket.requests if p.bucket.requests else 0.0 for p in points],
            "cost_per_1k_tokens": [self._cost_per_1k(p, model) for p in points],
            "slow_ttft": [_exemplar(p.bucket.slowest_ttft) for p in points],
            "replicas": self._replicas(points, model),
            "kv_cache_usage": self._kv_usage(grid),
            "alerts": {
                "firing": [_alert_dict(a) for a in self.slo.firing(model)],
                "recent": list(self.alert_log)[::-1],
            },
            "slowest": self._slowest(points),
        }
        return doc

    def _kv_usage(self, grid: list[float]) -> dict[str, list[float | None]]:
        """Each replica's KV-cache use at each grid time; replicas with no fresh point in the window left out."""
        out = {}
        for rid, pts in self.kv.series.items():
            values = [_last_at(pts, t, self.up_slack_s) for t in grid]
            if any(v is not None for v in values):
                out[rid] = values
        return out

    @staticmethod
    def _percentile_series(points: list[SeriesPoint], which: str) -> dict[str, list[float | None]]:
        rows = [_latency(getattr(p.bucket, which)) for p in points]
        return {k: [r[k] for r in rows] for k in ("p50", "p95", "p99", "mean")}

    def _cost_per_1k(self, p: SeriesPoint, model: str) -> float | None:
        """The replicas' cost in the bucket (the model's, when one is chosen) over the tokens served (None
        without tokens or replicas)."""
        tokens = p.bucket.output_tokens + p.bucket.prompt_tokens
        replicas = [r for r in self.replicas.replicas.values() if not model or r.model == model]
        if not tokens or not replicas:
            return None
        end = p.t + p.width_s
        usd = sum(
            r.seconds_in(p.t, end) / 3600.0 * self.prices.price(r.replica_type).gpu_hour_usd for r in replicas
        )
        return usd / tokens * 1000.0

    def _replicas(self, points: list[SeriesPoint], model: str) -> dict[str, Any]:
        """Replicas up at each point (per the uptime gauges) and the autoscaler's desired count, when it
        exports one."""
        mine = [r for r in self.replicas.replicas.values() if not model or r.model == model]
        actual = [sum(r.up_at(p.t + p.width_s, self.up_slack_s) for r in mine) for p in points]
        desired_series = {m: pts for m, pts in self.desired.series.items() if not model or m == model}
        desired: list[float | None] = []
        for p in points:
            values = [_last_at(pts, p.t + p.width_s, self.up_slack_s * 4) for pts in desired_series.values()]
            values = [v for v in values if v is not None]
            desired.append(sum(values) if values else None)
        return {"actual": actual, "desired": desired, "has_desired": bool(desired_series)}

    def _slowest(self, points: list[SeriesPoint]) -> list[dict[str, Any]]:
        ex = [p.bucket.slowest_e2e for p in points if p.bucket.slowest_e2e is not None]
        ex.sort(key=lambda e: -e.value_ms)
        return [
            {"e2e_ms": e.value_ms, "trace_id": e.trace_id, "request_id": e.request_id} for e in ex[:SLOWEST]
        ]


def _exemplar(e) -> dict[str, Any] | None:
    return None if e is None else {"ms": e.value_ms, "trace_id": e.trace_id, "request_id": e.request_id}


def _alert_dict(a: mpb.Alert) -> dict[str, Any]:
    return MessageToDict(a, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def trace_document(spans: list[mpb.Span]) -> dict[str, Any]:
    """A trace for the page's waterfall: spans with start/duration in ms from the trace's start."""
    if not spans:
        return {"spans": []}
    t0 = min(s.start_unix_nano for s in spans)
    return {
        "spans": [
            {
                "name": s.name,
                "service": s.service_name,
                "span_id": s.span_id,
                "parent_span_id": s.parent_span_id,
                "start_ms": (s.start_unix_nano - t0) / 1e6,
                "duration_ms": max(0, s.end_unix_nano - s.start_unix_nano) / 1e6,
                "error": s.status_code == 2,
                "attributes": dict(s.attributes),
            }
            for s in spans
        ]
    }

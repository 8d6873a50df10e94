"""Request statistics per model, version and tenant tier: counts and DDSketches of TTFT, TPOT and E2E in time
buckets, answering windows (Query) and per-bucket series (the dashboard) by merging buckets."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from fleetserve.metrics.v1 import metrics_service_pb2 as mpb

from services.metrics.records import ATTR_MODEL, ATTR_VERSION, MAX_LABEL_LEN, RequestRecord
from services.metrics.sketches import TieredBuckets, new_sketch, summarize

log = structlog.get_logger(__name__)

# 10 s buckets for the last 15 minutes, 5-minute buckets for a day: ~380 buckets per key.
DEFAULT_TIERS = ((10.0, 900.0), (300.0, 86_400.0))
# Model, version and tier names come from clients and deployments; a bound keeps a flood of made-up names from
# growing memory without limit.
MAX_KEYS = 1024
# A span stamped this far in the future (a skewed clock) is counted now rather than in a bucket far ahead.
MAX_FUTURE_S = 60.0

ATTR_REFUSAL = "fleetserve.output_refusal"

Key = tuple[str, str, str]  # (model, version, tier)


@dataclass(slots=True)
class Exemplar:
    """The slowest request of a bucket by one measure, to open its trace."""

    value_ms: float
    trace_id: str
    request_id: str


@dataclass(slots=True)
class LatencyBucket:
    """What the requests that ended in one time bucket add up to."""

    requests: int = 0
    errors: int = 0
    output_tokens: int = 0
    prompt_tokens: int = 0
    # Finished generations (engine spans) checked for a refusal, and those that were refusals.
    refusal_checked: int = 0
    refusals: int = 0
    # Feedback ratings received, and their sum.
    feedback_count: int = 0
    feedback_sum: float = 0.0
    # Sketches are made on first use: most buckets of a quiet model hold few values.
    ttft: object = None
    tpot: object = None
    e2e: object = None
    slowest_ttft: Exemplar | None = None
    slowest_e2e: Exemplar | None = None

    def add(self, r: RequestRecord) -> None:
        self.requests += 1
        self.errors += r.fleet_error
        self.output_tokens += r.output_tokens
        self.prompt_tokens += r.prompt_tokens
        if r.ttft_ms is not None:
            self.ttft = self._add(self.ttft, r.ttft_ms)
            if self.slowest_ttft is None or r.ttft_ms > self.slowest_ttft.value_ms:
                self.slowest_ttft = Exemplar(r.ttft_ms, r.trace_id, r.request_id)
        tpot = r.tpot_ms
        if tpot is not None:
            self.tpot = self._add(self.tpot, tpot)
        # E2E counts requests that finished OK: a rejected or cancelled request's duration says nothing about
        # serving latency.
        if r.status_code == 0:
            self.e2e = self._add(self.e2e, r.e2e_ms)
            if self.slowest_e2e is None or r.e2e_ms > self.slowest_e2e.value_ms:
                self.slowest_e2e = Exemplar(r.e2e_ms, r.trace_id, r.request_id)

    @staticmethod
    def _add(sketch, value: float):
        if sketch is None:
            sketch = new_sketch()
        sketch.add(max(0.0, value))
        return sketch

    def merge(self, other: LatencyBucket) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.output_tokens += other.output_tokens
        self.prompt_tokens += other.prompt_tokens
        self.refusal_checked += other.refusal_checked
        self.refusals += other.refusals
        self.feedback_count += other.feedback_count
        self.feedback_sum += other.feedback_sum
        self.ttft = _merge_into(self.ttft, other.ttft)
        self.tpot = _merge_into(self.tpot, other.tpot)
        self.e2e = _merge_into(self.e2e, other.e2e)
        self.slowest_ttft = _slower(self.slowest_ttft, other.slowest_ttft)
        self.slowest_e2e = _slower(self.slowest_e2e, other.slowest_e2e)


def _merge_into(a, b):
    if b is None or not b.count:
        return a
    if a is None:
        a = new_sketch()
    a.merge(b)
    return a


def _slower(a: Exemplar | None, b: Exemplar | None) -> Exemplar | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a.value_ms >= b.value_ms else b


def combine(buckets) -> LatencyBucket:
    """One bucket holding what all the given buckets hold."""
    out = LatencyBucket()
    for b in buckets:
        out.merge(b)
    return out


def model_stats(model: str, b: LatencyBucket) -> mpb.ModelStats:
    """One model's summary of a (combined) bucket."""
    return mpb.ModelStats(
        model=model,
        requests=b.requests,
        errors=b.errors,
        error_rate=b.errors / b.requests if b.requests else 0.0,
        ttft_ms=summarize(b.ttft),
        tpot_ms=summarize(b.tpot),
        e2e_ms=summarize(b.e2e),
        output_tokens=b.output_tokens,
        prompt_tokens=b.prompt_tokens,
        refusals=b.refusals,
        refusal_checked=b.refusal_checked,
        feedback_count=b.feedback_count,
        feedback_mean=b.feedback_sum / b.feedback_count if b.feedback_count else 0.0,
    )


@dataclass
class SeriesPoint:
    """One time bucket of one model, merged over versions and tiers (the dashboard's data)."""

    t: float
    width_s: float
    bucket: LatencyBucket = field(default_factory=LatencyBucket)


class RequestStats:
    """Tiered buckets per (model, version, tier). Memory is bounded by keys x buckets per key, not requests."""

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        tiers=DEFAULT_TIERS,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self._clock = clock
        self.tiers = tiers
        self.max_keys = max_keys
        self._keys: dict[Key, TieredBuckets[LatencyBucket]] = {}
        self.dropped_keys = 0
        self.dropped_late = 0

    def _bucket(self, key: Key, t: float) -> LatencyBucket | None:
        series = self._keys.get(key)
        if series is None:
            if len(self._keys) >= self.max_keys:
                self.dropped_keys += 1
                if self.dropped_keys == 1:
                    log.warning("metrics.too_many_series", max_keys=self.max_keys, model=key[0])
                return None
            series = self._keys[key] = TieredBuckets(LatencyBucket, self.tiers)
        now = self._clock()
        bucket = series.bucket(min(t, now + MAX_FUTURE_S), now)
        if bucket is None:
            self.dropped_late += 1
        return bucket

    def add(self, r: RequestRecord) -> None:
        bucket = self._bucket((r.asked_model, r.version, r.tier), r.end_unix_s)
        if bucket is not None:
            bucket.add(r)

    def add_engine_span(self, span, attrs: Mapping[str, Any], trace_id: str) -> None:
        """A finished generation's refusal check (engine.Generate carries fleetserve.output_refusal only when the
        generation finished; failed and cut-short attempts carry none and are left out), under the model and
        version the engine served (no tier: Query merges tiers)."""
        refusal = attrs.get(ATTR_REFUSAL)
        model = attrs.get(ATTR_MODEL)
        if not isinstance(refusal, bool) or not isinstance(model, str) or not model:
            return
        version = attrs.get(ATTR_VERSION)
        key = (model[:MAX_LABEL_LEN], version[:MAX_LABEL_LEN] if isinstance(version, str) else "", "")
        bucket = self._bucket(key, span.end_time_unix_nano / 1e9)
        if bucket is not None:
            bucket.refusal_checked += 1
            bucket.refusals += refusal

    def add_rating(self, model: str, version: str, rating: float, t: float) -> None:
        """A feedback rating (1-5) of a request of model and version, as QualityStore resolved it from a
        gateway.Feedback span (its rating_sinks)."""
        key = (model[:MAX_LABEL_LEN], version[:MAX_LABEL_LEN], "")
        bucket = self._bucket(key, t)
        if bucket is not None:
            bucket.feedback_count += 1
            bucket.feedback_sum += float(rating)

    def models(self) -> list[str]:
        return sorted({k[0] for k in self._keys})

    def keys(self) -> list[Key]:
        return sorted(self._keys)

    def window(
        self,
        window_s: float = 0.0,
        now: float | None = None,
        match: Callable[[Key], bool] = lambda k: True,
        overlap: bool = False,
    ) -> LatencyBucket:
        """Everything of the keys that match, over the last window_s seconds (0: all kept); with overlap, every
        bucket that overlaps the window (an explicit window's edge buckets count whole, as in cost reports)."""
        now = self._clock() if now is None else now
        start = now - window_s if window_s > 0 else -float("inf")
        return combine(
            b
            for key, series in self._keys.items()
            if match(key)
            for _, _, b in series.select(start, float("inf"), now, overlap=overlap)
        )

    def query(
        self, model: str = "", window_s: float = 0.0, now: float | None = None, version: str = ""
    ) -> list[mpb.ModelStats]:
        """Per-model stats of requests that ended in the last window_s seconds (0: all kept), for model or
        every model, merged over tiers and (unless one is given) versions; models with no request in the
        window are left out."""
        out = []
        for name in [model] if model else self.models():
            b = self.window(
                window_s, now, lambda k, name=name: k[0] == name and (not version or k[1] == version)
            )
            if b.requests:
                out.append(model_stats(name, b))
        return out

    def series(self, model: str, window_s: float, now: float | None = None) -> list[SeriesPoint]:
        """Per-bucket points of one model ("" = every model) over the last window_s seconds, oldest first."""
        now = self._clock() if now is None else now
        points: dict[float, SeriesPoint] = {}
        for key, series in self._keys.items():
            if model and key[0] != model:
                continue
            for start, width, b in series.select(now - window_s, float("inf"), now):
                p = points.get(start)
                if p is None:
                    p = points[start] = SeriesPoint(start, width)
                p.bucket.merge(b)
        return [points[t] for t in sorted(points)]

"""Mergeable latency sketches (DDSketch) and time buckets kept at two resolutions, so any window is a merge of
buckets and memory stays bounded however many requests arrive."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, Protocol, TypeVar

from ddsketch import LogCollapsingLowestDenseDDSketch
from fleetserve.metrics.v1 import metrics_service_pb2 as mpb

# 1% relative accuracy: a p99 of 200 ms reads as 198-202 ms. 2048 bins cover 1 us .. hours at that accuracy
# (collapsing the lowest bins first, where accuracy matters least for tail latency).
RELATIVE_ACCURACY = 0.01
BIN_LIMIT = 2048
QUANTILES = (0.5, 0.95, 0.99)


def new_sketch(relative_accuracy: float = RELATIVE_ACCURACY) -> LogCollapsingLowestDenseDDSketch:
    """An empty sketch; sketches of the same accuracy merge exactly (the merge equals one sketch of all values)."""
    return LogCollapsingLowestDenseDDSketch(relative_accuracy, BIN_LIMIT)


def merged(sketches: Iterable[LogCollapsingLowestDenseDDSketch | None]) -> LogCollapsingLowestDenseDDSketch:
    """One sketch holding every value of the given ones (None entries are skipped)."""
    out = new_sketch()
    for s in sketches:
        if s is not None and s.count:
            out.merge(s)
    return out


def summarize(sketch: LogCollapsingLowestDenseDDSketch | None) -> mpb.LatencySummary:
    """Count, exact mean, and p50/p95/p99 within the sketch's relative accuracy; all zero when empty."""
    if sketch is None or not sketch.count:
        return mpb.LatencySummary()
    p50, p95, p99 = (sketch.get_quantile_value(q) for q in QUANTILES)
    return mpb.LatencySummary(
        count=int(sketch.count), p50=p50, p95=p95, p99=p99, mean=sketch.sum / sketch.count
    )


def summarize_values(values: Iterable[float]) -> mpb.LatencySummary:
    """summarize() of a sketch of values (tests, small lists)."""
    s = new_sketch()
    for v in values:
        s.add(max(0.0, v))
    return summarize(s)


class Mergeable(Protocol):
    def merge(self, other) -> None: ...


B = TypeVar("B", bound=Mergeable)


class TieredBuckets(Generic[B]):
    """Values bucketed by time: fine buckets (tiers[0] = (width_s, keep_s)) are merged into the next tier's
    coarser buckets once older than keep_s, and the last tier's buckets are dropped after its keep_s. Every
    moment's data lives in exactly one bucket, so a window never counts anything twice."""

    def __init__(self, factory: Callable[[], B], tiers: Sequence[tuple[float, float]]) -> None:
        if not tiers or any(w <= 0 or keep < w for w, keep in tiers):
            raise ValueError(f"tiers must be (width_s > 0, keep_s >= width_s) pairs; got {tiers!r}")
        self.factory = factory
        self.tiers = tuple(tiers)
        self._buckets: list[dict[float, B]] = [{} for _ in tiers]
        self._rolled_at = -math.inf

    @property
    def retention_s(self) -> float:
        return self.tiers[-1][1]

    def bucket(self, t: float, now: float) -> B | None:
        """The bucket for time t (created when missing): in the finest tier that still keeps t; None when t
        is older than every tier keeps."""
        self.roll(now)
        for (width, keep), buckets in zip(self.tiers, self._buckets, strict=True):
            start = math.floor(t / width) * width
            if start + width > now - keep:
                b = buckets.get(start)
                if b is None:
                    b = buckets[start] = self.factory()
                return b
        return None

    def roll(self, now: float) -> None:
        """Move buckets that aged out of a tier into the next one (or drop them from the last)."""
        width0 = self.tiers[0][0]
        if now - self._rolled_at < width0:
            return
        self._rolled_at = now
        for i, (width, keep) in enumerate(self.tiers):
            buckets = self._buckets[i]
            old = [start for start in buckets if start + width <= now - keep]
            for start in old:
                b = buckets.pop(start)
                if i + 1 < len(self.tiers):
                    nwidth = self.tiers[i + 1][0]
                    nstart = math.floor(start / nwidth) * nwidth
                    target = self._buckets[i + 1].get(nstart)
                    if target is None:
                        self._buckets[i + 1][nstart] = b
                    else:
                        target.merge(b)

    def select(
        self, start: float, end: float, now: float, overlap: bool = False
    ) -> list[tuple[float, float, B]]:
        """(bucket start, width, bucket) of every bucket whose midpoint lies in [start, end) (the bucket that
        is filling now counts when end >= now), or with overlap every bucket that overlaps [start, end];
        oldest first."""
        self.roll(now)
        out = []
        for (width, _), buckets in zip(self.tiers, self._buckets, strict=True):
            lo = start - width if overlap else start - width / 2
            for s, b in buckets.items():
                if s > lo and s < end:
                    out.append((s, width, b))
        out.sort(key=lambda x: x[0])
        return out

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets)

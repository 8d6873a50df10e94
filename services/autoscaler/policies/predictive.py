"""Predictive scaling: a forecast of the arrival rate over the next cold start, so replicas are started before
the load arrives. The forecaster is seasonal-naive with a level (trend) correction: the rate one season ago over
the coming horizon, times today's level relative to that season's over the last trend window (Hyndman's
seasonal naive, the standard strong baseline for strongly seasonal series); before a full season of history
it extrapolates the recent linear trend (Holt's linear method without smoothing). Chosen over Holt-Winters
(statsmodels): at the resolution a one-minute cold start needs (1-minute buckets, 1,440 per daily season) a
Holt-Winters fit optimises 1,440 seasonal states, takes seconds and can fail to converge at every refit, while
seasonal-naive is O(horizon) per decision, needs no fit, and copies a daily spike to the minute. Its lead time
is the longest of the cold starts the autoscaler measured (plus a margin), not a constant."""

from __future__ import annotations

import math
from typing import Any

from services.autoscaler.policies import Desire, Policy, take
from services.autoscaler.policies.capacity import fewer_only_past_tolerance, replica_rate
from services.autoscaler.signals import ModelSignals

DEFAULTS: dict[str, Any] = {
    "period_s": 86400.0,  # the season (a day)
    "bucket_s": 60.0,  # history resolution
    "trend_window_s": 1800.0,  # level correction: this window now vs one season ago
    "max_trend": 2.0,  # the level ratio is clipped to [1/max_trend, max_trend]
    "lead_margin_s": 30.0,  # added to the measured cold start: decision interval, registration, routing
    "headroom": 0.1,
    # Hysteresis: fewer replicas only once the need is this fraction below the smaller count's capacity.
    "tolerance": 0.1,
    "replica_rps": 0.0,
    "replica_concurrency": 0.0,
}


class SeasonalNaive:
    """Arrival-rate history in buckets and its forecast."""

    def __init__(self, period_s: float, bucket_s: float, trend_window_s: float, max_trend: float) -> None:
        self.bucket_s = bucket_s
        self.period = max(1, round(period_s / bucket_s))
        self.trend = max(1, round(trend_window_s / bucket_s))
        self.max_trend = max_trend
        self._sum: dict[int, float] = {}
        self._n: dict[int, int] = {}

    def observe(self, now: float, rate: float) -> None:
        b = int(now // self.bucket_s)
        self._sum[b] = self._sum.get(b, 0.0) + rate
        self._n[b] = self._n.get(b, 0) + 1
        # Keep one season plus what a forecast and its level correction look at (bounded memory).
        oldest = b - self.period - self.trend - 2
        if len(self._sum) > self.period + self.trend + 8:
            for k in [k for k in self._sum if k < oldest]:
                del self._sum[k], self._n[k]

    def mean(self, b: int) -> float | None:
        n = self._n.get(b)
        return None if not n else self._sum[b] / n

    def _window_mean(self, start: int, end: int) -> float | None:
        vals = [v for b in range(start, end) if (v := self.mean(b)) is not None]
        return sum(vals) / len(vals) if len(vals) >= max(1, (end - start) // 2) else None

    def forecast_peak(self, now: float, horizon_s: float) -> tuple[float, str, float]:
        """(the highest rate expected in [now, now + horizon_s], the method used, the level ratio)."""
        b = int(now // self.bucket_s)
        ahead = range(b, b + math.ceil(horizon_s / self.bucket_s) + 1)
        past = [self.mean(x - self.period) for x in ahead]
        if any(v is not None for v in past):
            today = self._window_mean(b - self.trend, b)
            then = self._window_mean(b - self.trend - self.period, b - self.period)
            ratio = 1.0
            if today is not None and then:
                ratio = min(self.max_trend, max(1.0 / self.max_trend, today / then))
            return max(v for v in past if v is not None) * ratio, "seasonal", ratio
        recent = [(x, v) for x in range(b - self.trend, b + 1) if (v := self.mean(x)) is not None]
        if len(recent) < 2:
            return (recent[-1][1] if recent else 0.0), "last", 1.0
        xs = [x for x, _ in recent]
        ys = [v for _, v in recent]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in recent) / var if var else 0.0
        level = my + slope * (b - mx)
        return max(ys[-1], level + slope * max(0.0, horizon_s / self.bucket_s)), "trend", 1.0


def history(options: dict[str, Any]) -> SeasonalNaive:
    """An empty arrival-rate history as the predictive policy with these options keeps it (one per model, shared
    by its versions' policies: a new version inherits the model's season)."""
    o = _options(options)
    return SeasonalNaive(o["period_s"], o["bucket_s"], o["trend_window_s"], o["max_trend"])


def _options(options: dict[str, Any]) -> dict[str, Any]:
    o = take(options, DEFAULTS, Predictive.name)
    if o["bucket_s"] <= 0 or o["period_s"] < o["bucket_s"]:
        raise ValueError("predictive.period_s: must be at least bucket_s (> 0)")
    if o["max_trend"] < 1:
        raise ValueError("predictive.max_trend: must be >= 1")
    return o


class Predictive(Policy):
    """Forecasts the model's arrivals and asks for this version's share of them (ModelSignals.share). With a
    `history` given, that history is the model's and its owner feeds it; otherwise this policy keeps its own
    (fed through observe)."""

    name = "predictive"

    def __init__(
        self,
        fallback_rps: float,
        default_cold_start_s: float,
        history: SeasonalNaive | None = None,
        **opts: float,
    ) -> None:
        self.fallback_rps = fallback_rps
        self.default_cold_start_s = default_cold_start_s
        self.o = opts
        self.owns_history = history is None
        self.model = history or SeasonalNaive(
            opts["period_s"], opts["bucket_s"], opts["trend_window_s"], opts["max_trend"]
        )

    @classmethod
    def from_options(
        cls,
        options: dict[str, Any],
        *,
        replica_rps: float,
        default_cold_start_s: float,
        history: SeasonalNaive | None = None,
        **_: Any,
    ) -> Predictive:
        o = _options(options)
        if not (o["replica_rps"] or o["replica_concurrency"] or replica_rps):
            raise ValueError("predictive: needs replica_rps (requests/s one replica serves within the SLO)")
        return cls(replica_rps, default_cold_start_s, history, **o)

    def observe(self, now: float, arrival_rate: float) -> None:
        if self.owns_history:
            self.model.observe(now, arrival_rate)

    def desire(self, s: ModelSignals) -> Desire:
        mu = replica_rate(self.o, s, self.fallback_rps)
        lead = s.cold_start_s(self.default_cold_start_s) + self.o["lead_margin_s"]
        model_peak, how, ratio = self.model.forecast_peak(s.now, lead)
        # The model's forecast, this version's share of it (1 without rollouts); now is inside the horizon too.
        peak = max(model_peak * s.share, s.arrival_rate)
        want = (
            fewer_only_past_tolerance(peak * (1 + self.o["headroom"]) / mu, s.actual, self.o["tolerance"])
            if mu > 0
            else None
        )
        numbers = {
            "forecast_peak_rps": round(peak, 3),
            "lead_s": round(lead, 1),
            "level_ratio": round(ratio, 3),
            "share": round(s.share, 4),
            "replica_rps": round(mu, 3),
        }
        reason = f"{how} forecast: up to {peak:.1f} req/s in the next {lead:.0f}s -> {want}"
        return Desire(self.name, want, f"forecast_{how}", reason, numbers)

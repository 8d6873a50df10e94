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
    # Forecast-aware scale-down: when the seasonal forecast over the whole lead time (and the present rate) asks
    # for fewer replicas, a scale-down needs only this many seconds of agreement, not scale_down_cooldown_s.
    # The forecast already looked a cold start ahead, which is what a long hold guesses at; set it at or above
    # scale_down_cooldown_s to keep the plain hold.
    "scale_down_hold_s": 60.0,
    # ... and it keeps the replicas the forecast needs again within this many seconds (the bench's flap window:
    # a replica stopped and needed back within it would be a reversal).
    "keep_ahead_s": 600.0,
    # The short hold is for a load that is gone: the forecast asks for at least this fraction fewer replicas.
    "gone_fraction": 0.25,
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
        # The buckets that overlap [now, now + horizon]: no more (a bucket past the horizon starts replicas early).
        ahead = range(b, int((now + horizon_s) // self.bucket_s) + 1)
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
    if o["gone_fraction"] >= 1:
        raise ValueError("predictive.gone_fraction: must be below 1")
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
        numbers = {
            "forecast_peak_rps": round(peak, 3),
            "lead_s": round(lead, 1),
            "level_ratio": round(ratio, 3),
            "share": round(s.share, 4),
            "replica_rps": round(mu, 3),
        }
        if mu <= 0:
            return Desire(self.name, None, f"forecast_{how}", "replica capacity unknown", numbers)
        headroom, tol = 1 + self.o["headroom"], self.o["tolerance"]
        want = fewer_only_past_tolerance(peak * headroom / mu, s.actual, tol)
        reason = f"{how} forecast: up to {peak:.1f} req/s in the next {lead:.0f}s -> {want}"
        hold = None
        gone = s.actual * (1 - self.o["gone_fraction"])
        if how == "seasonal" and want <= gone:
            # Forecast-aware scale-down, for a load that is gone (a peak ended: the count drops by gone_fraction
            # or more). It looks ahead, not back: a replica the forecast needs again within keep_ahead_s stays
            # (stopping and restarting it costs a cold start and a flap); one it does not goes after only
            # scale_down_hold_s, where the decider's plain hold would keep a past peak's replicas for
            # scale_down_cooldown_s. A gradual decline keeps the plain hold, which also absorbs the present's
            # wander the forecast cannot know (yesterday's noise is not today's). Only a seasonal forecast vouches:
            # a trend extrapolated from minutes of history has not seen what comes after a drop.
            # (At most half a season: further ahead, "one season ago" would be today's own past.)
            keep_ahead = max(lead, min(self.o["keep_ahead_s"], self.o["period_s"] / 2))
            later, _, _ = self.model.forecast_peak(s.now, keep_ahead)
            later = max(later * s.share, s.arrival_rate)
            keep = fewer_only_past_tolerance(later * headroom / mu, s.actual, tol)
            numbers["keep_ahead_peak_rps"] = round(later, 3)
            if keep > want:
                want = keep
                reason += f" (keeps {keep}: up to {later:.1f} req/s within {keep_ahead:.0f}s)"
            if want <= gone:
                hold = self.o["scale_down_hold_s"]
        return Desire(self.name, want, f"forecast_{how}", reason, numbers, down_hold_s=hold)

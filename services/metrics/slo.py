"""SLO objects and multi-window, multi-burn-rate alerts (Google SRE workbook, "Alerting on SLOs"): every SLO
counts good and bad events in ring buffers of time buckets, and each alert rule fires while the burn rate over
both its long and its short window is at least its threshold."""

from __future__ import annotations

import math
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog
from fleetserve.metrics.v1 import metrics_service_pb2 as mpb

from services.metrics.records import RequestRecord

log = structlog.get_logger(__name__)

HOUR = 3600.0
DAY = 24 * HOUR
KINDS = {
    "availability": mpb.SLO_KIND_AVAILABILITY,
    "ttft": mpb.SLO_KIND_TTFT,
    "tpot": mpb.SLO_KIND_TPOT,
}
SEVERITIES = {"page": mpb.ALERT_SEVERITY_PAGE, "ticket": mpb.ALERT_SEVERITY_TICKET}
# Every SLO model pattern matches at most this many models (a bound on objects made from client-chosen names).
MAX_OBJECTS = 4096
ANY_MODEL = "*"


@dataclass(frozen=True)
class AlertRule:
    """Fire while the burn rate is >= burn_rate over both windows (seconds of real time, before compression)."""

    name: str
    burn_rate: float
    long_window_s: float
    short_window_s: float
    severity: str = "page"


# The SRE workbook's table for a 30-day SLO: 2% of the budget in 1 h or 5% in 6 h pages; 10% in 1 d or 10% in
# 3 d opens a ticket. The short window (1/12 of the long one) makes an alert stop soon after the burn stops.
DEFAULT_RULES = (
    AlertRule("fast-1h", 14.4, 1 * HOUR, 5 * 60.0, "page"),
    AlertRule("fast-6h", 6.0, 6 * HOUR, 30 * 60.0, "page"),
    AlertRule("slow-1d", 3.0, 1 * DAY, 2 * HOUR, "ticket"),
    AlertRule("slow-3d", 1.0, 3 * DAY, 6 * HOUR, "ticket"),
)


@dataclass(frozen=True)
class SloSpec:
    """An objective as configured: model may be "*" (one SLO object per model seen)."""

    name: str
    kind: str
    objective: float
    model: str = ANY_MODEL
    tier: str = ""
    threshold_ms: float = 0.0
    period_s: float = 30 * DAY

    def check(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"SLO {self.name!r}: kind must be one of {sorted(KINDS)}, got {self.kind!r}")
        if not 0.0 < self.objective < 1.0:
            raise ValueError(f"SLO {self.name!r}: objective must be in (0, 1), got {self.objective}")
        if self.kind != "availability" and self.threshold_ms <= 0:
            raise ValueError(f"SLO {self.name!r}: a latency SLO needs threshold_ms > 0")
        if self.period_s <= 0:
            raise ValueError(f"SLO {self.name!r}: period_s must be > 0")

    def object_name(self, model: str) -> str:
        """The name of this spec's object for one model ("{model}" in the name is replaced by it)."""
        if "{model}" in self.name:
            return self.name.replace("{model}", model)
        return self.name if self.model != ANY_MODEL else f"{model}-{self.name}"


# Out of the box, every model gets the objectives of an interactive LLM service.
DEFAULT_SLOS = (
    SloSpec("availability", "availability", 0.999),
    SloSpec("ttft-p99", "ttft", 0.99, threshold_ms=2000.0),
    SloSpec("tpot-p99", "tpot", 0.99, threshold_ms=100.0),
)


@dataclass(frozen=True)
class SloConfig:
    """SLO specs, alert rules, and the time compression that shrinks every window and period alike (tests and
    demos: with time_scale 3600 an hour of the SRE table lasts a second)."""

    slos: tuple[SloSpec, ...] = DEFAULT_SLOS
    rules: tuple[AlertRule, ...] = DEFAULT_RULES
    time_scale: float = 1.0
    # Fewest events in a rule's short window for it to fire: a handful of requests says little about a rate.
    min_events: int = 10

    def scaled(self, seconds: float) -> float:
        return seconds / self.time_scale


def load_slo_config(path: str = "", time_scale: float = 1.0, min_events: int = 10) -> SloConfig:
    """The config of an SLO file (TOML: [[slo]] tables with name, kind, objective, model, tier, threshold_ms,
    period_days; optional [[rule]] tables with name, burn_rate, long_window_s, short_window_s, severity), or the
    defaults without a path. ValueError naming the file and the problem."""
    if time_scale <= 0:
        raise ValueError("time_scale must be > 0")
    if not path:
        return SloConfig(time_scale=time_scale, min_events=min_events)
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"SLO file {path}: {e}") from None
    try:
        slos = (
            tuple(
                SloSpec(
                    name=str(s["name"]),
                    kind=str(s["kind"]),
                    objective=float(s["objective"]),
                    model=str(s.get("model", ANY_MODEL)),
                    tier=str(s.get("tier", "")),
                    threshold_ms=float(s.get("threshold_ms", 0.0)),
                    period_s=float(s.get("period_days", 30)) * DAY,
                )
                for s in data.get("slo", [])
            )
            or DEFAULT_SLOS
        )
        rules = (
            tuple(
                AlertRule(
                    name=str(r["name"]),
                    burn_rate=float(r["burn_rate"]),
                    long_window_s=float(r["long_window_s"]),
                    short_window_s=float(r["short_window_s"]),
                    severity=str(r.get("severity", "page")),
                )
                for r in data.get("rule", [])
            )
            or DEFAULT_RULES
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"SLO file {path}: {e!r}") from None
    config = SloConfig(slos, rules, time_scale, min_events)
    check_config(config)
    return config


def check_config(config: SloConfig) -> None:
    """ValueError for duplicate names, bad objectives, or rules whose windows make no sense."""
    names = [s.name for s in config.slos]
    if len(set(names)) != len(names):
        raise ValueError(f"SLO names must be unique: {names}")
    for s in config.slos:
        s.check()
    for r in config.rules:
        if r.severity not in SEVERITIES:
            raise ValueError(f"rule {r.name!r}: severity must be page or ticket")
        if not 0 < r.short_window_s <= r.long_window_s or r.burn_rate <= 0:
            raise ValueError(f"rule {r.name!r}: needs 0 < short_window_s <= long_window_s and burn_rate > 0")


class EventRing:
    """Event and bad-event counts in `width_s` buckets covering at least `span_s`, in fixed numpy arrays: a
    window's sums are one masked sum, and memory does not grow with traffic. Adds go to a small dict first and
    reach the arrays when a sum is asked for (a numpy scalar update per request would cost more than the rest
    of a request's bookkeeping)."""

    def __init__(self, width_s: float, span_s: float) -> None:
        self.width_s = width_s
        self.n = int(math.ceil(span_s / width_s)) + 2
        self._index = np.full(self.n, -1, dtype=np.int64)
        self._events = np.zeros(self.n, dtype=np.int64)
        self._bad = np.zeros(self.n, dtype=np.int64)
        self._pending: dict[int, list[int]] = {}
        self._version = 0
        self._cache_key: tuple[int, int] | None = None
        self._cumulative: tuple[np.ndarray, np.ndarray] = (self._events, self._bad)

    def add(self, t: float, bad: bool) -> None:
        i = int(t // self.width_s)
        counts = self._pending.get(i)
        if counts is None:
            counts = self._pending[i] = [0, 0]
        counts[0] += 1
        counts[1] += bad

    def _flush(self) -> None:
        for i in sorted(self._pending):
            events, bad = self._pending[i]
            slot = i % self.n
            if self._index[slot] != i:
                if self._index[slot] > i:
                    continue  # older than the ring reaches
                self._index[slot] = i
                self._events[slot] = 0
                self._bad[slot] = 0
            self._events[slot] += events
            self._bad[slot] += bad
        self._pending.clear()
        self._version += 1

    def sums(self, window_s: float, now: float) -> tuple[int, int]:
        """(events, bad events) in the buckets that overlap the last window_s seconds."""
        last, (events, bad) = self._cumulative_by_age(now)
        k = min(self.n, last - (int((now - window_s) // self.width_s) + 1) + 1)
        return (int(events[k - 1]), int(bad[k - 1])) if k > 0 else (0, 0)

    def _cumulative_by_age(self, now: float) -> tuple[int, tuple[np.ndarray, np.ndarray]]:
        """Counts summed from the newest bucket back, once per (bucket, change): an evaluation asks for every
        rule's windows, and each is then one lookup instead of a pass over the ring."""
        if self._pending:
            self._flush()
        last = int(now // self.width_s)
        if self._cache_key != (last, self._version):
            age = last - self._index
            ok = (self._index >= 0) & (age >= 0) & (age < self.n)
            events = np.zeros(self.n, dtype=np.int64)
            bad = np.zeros(self.n, dtype=np.int64)
            events[age[ok]] = self._events[ok]  # each slot holds a different bucket: ages are distinct
            bad[age[ok]] = self._bad[ok]
            self._cumulative = (np.cumsum(events), np.cumsum(bad))
            self._cache_key = (last, self._version)
        return last, self._cumulative


def burn_rate(events: int, bad: int, objective: float) -> float:
    """How many times faster than the budget allows the window spent it: (bad / events) / (1 - objective)."""
    return (bad / events) / (1.0 - objective) if events else 0.0


def is_bad(kind: str, r: RequestRecord, threshold_ms: float) -> bool | None:
    """Whether a request is a bad event of an SLO kind; None when it is no event of that kind (a latency SLO
    counts only requests that got that far)."""
    if kind == "availability":
        # Valid events are the requests the fleet had to serve: a client's own mistakes, cancellations and rate
        # limits are none (SRE workbook), or a client hammering with bad keys would dilute an outage away.
        if r.status_code != 0 and not r.fleet_error:
            return None
        return r.fleet_error
    if kind == "ttft":
        return None if r.ttft_ms is None else r.ttft_ms > threshold_ms
    tpot = r.tpot_ms
    return None if tpot is None else tpot > threshold_ms


@dataclass
class AlertState:
    """One rule of one SLO object: firing or not, and since when."""

    rule: AlertRule
    firing: bool = False
    fired_unix: float = 0.0
    resolved_unix: float = 0.0
    long_burn: float = 0.0
    short_burn: float = 0.0


@dataclass
class SloObject:
    """A spec bound to one model: its rings and the state of each of its alert rules."""

    spec: SloSpec
    model: str
    name: str
    config: SloConfig
    alert_ring: EventRing = field(init=False)
    budget_ring: EventRing = field(init=False)
    alerts: list[AlertState] = field(init=False)

    def __post_init__(self) -> None:
        cfg = self.config
        shortest = min(cfg.scaled(r.short_window_s) for r in cfg.rules)
        longest = max(cfg.scaled(r.long_window_s) for r in cfg.rules)
        # 30 buckets in the shortest window keep its edge error near 3%; the budget period needs less.
        self.alert_ring = EventRing(shortest / 30, longest)
        period = cfg.scaled(self.spec.period_s)
        self.budget_ring = EventRing(period / 1440, period)
        self.alerts = [AlertState(r) for r in cfg.rules]

    def matches(self, r: RequestRecord) -> bool:
        return r.asked_model == self.model and (not self.spec.tier or r.tier == self.spec.tier)

    def add(self, r: RequestRecord) -> None:
        bad = is_bad(self.spec.kind, r, self.spec.threshold_ms)
        if bad is None:
            return
        self.alert_ring.add(r.end_unix_s, bad)
        self.budget_ring.add(r.end_unix_s, bad)

    def burn(self, window_s: float, now: float) -> tuple[float, int, int]:
        events, bad = self.alert_ring.sums(window_s, now)
        return burn_rate(events, bad, self.spec.objective), events, bad

    def proto(self) -> mpb.Slo:
        s = self.spec
        return mpb.Slo(
            name=self.name,
            model=self.model,
            tier=s.tier,
            kind=KINDS[s.kind],
            objective=s.objective,
            threshold_ms=s.threshold_ms,
            period_s=self.config.scaled(s.period_s),
        )

    def alert_proto(self, a: AlertState) -> mpb.Alert:
        cfg, r = self.config, a.rule
        state = mpb.ALERT_STATE_FIRING if a.firing else mpb.ALERT_STATE_RESOLVED
        long_s, short_s = cfg.scaled(r.long_window_s), cfg.scaled(r.short_window_s)
        verb = "burning" if a.firing else "recovered from"
        return mpb.Alert(
            alert_id=f"{self.name}/{r.name}",
            slo=self.name,
            model=self.model,
            tier=self.spec.tier,
            rule=r.name,
            severity=SEVERITIES[r.severity],
            state=state,
            burn_rate_threshold=r.burn_rate,
            long_window_s=long_s,
            short_window_s=short_s,
            long_burn_rate=a.long_burn,
            short_burn_rate=a.short_burn,
            fired_unix=a.fired_unix,
            resolved_unix=a.resolved_unix,
            summary=(
                f"{self.name} {verb} error budget at >= {r.burn_rate:g}x "
                f"({_dur(long_s)}: {a.long_burn:.1f}x, {_dur(short_s)}: {a.short_burn:.1f}x)"
            ),
        )


def _dur(seconds: float) -> str:
    for unit, n in (("d", DAY), ("h", HOUR), ("m", 60.0)):
        if seconds >= n and (seconds / n).is_integer():
            return f"{int(seconds / n)}{unit}"
    return f"{seconds:g}s"


class SloEngine:
    """Feeds request records to the SLO objects they match, evaluates the alert rules, and reports each alert
    that fires or resolves to the listeners (WatchAlerts streams) and to the log."""

    def __init__(self, config: SloConfig, clock: Callable[[], float] = time.time) -> None:
        check_config(config)
        self.config = config
        self._clock = clock
        self.objects: dict[str, SloObject] = {}
        self._by_model: dict[str, list[SloObject]] = {}
        self.listeners: list[Callable[[list[mpb.Alert]], None]] = []
        self.dropped_objects = 0

    def add(self, r: RequestRecord) -> None:
        model = r.asked_model
        objs = self._by_model.get(model)
        if objs is None:
            objs = self._by_model[model] = self._objects_for(model)
        for o in objs:
            if o.matches(r):
                o.add(r)

    def _objects_for(self, model: str) -> list[SloObject]:
        out = []
        for spec in self.config.slos:
            if spec.model not in (ANY_MODEL, model):
                continue
            name = spec.object_name(model)
            if name not in self.objects:
                if len(self.objects) >= MAX_OBJECTS:
                    self.dropped_objects += 1
                    continue
                self.objects[name] = SloObject(spec, model, name, self.config)
            out.append(self.objects[name])
        return out

    def evaluate(self, now: float | None = None) -> list[mpb.Alert]:
        """Re-check every rule of every SLO object; the alerts that changed (fired or resolved)."""
        now = self._clock() if now is None else now
        changed = []
        for obj in self.objects.values():
            for a in obj.alerts:
                r = a.rule
                long_burn, _, _ = obj.burn(self.config.scaled(r.long_window_s), now)
                short_burn, short_events, _ = obj.burn(self.config.scaled(r.short_window_s), now)
                firing = (
                    long_burn >= r.burn_rate
                    and short_burn >= r.burn_rate
                    and short_events >= self.config.min_events
                )
                if firing == a.firing:
                    continue
                a.firing, a.long_burn, a.short_burn = firing, long_burn, short_burn
                if firing:
                    a.fired_unix, a.resolved_unix = now, 0.0
                else:
                    a.resolved_unix = now
                alert = obj.alert_proto(a)
                changed.append(alert)
                self._log(alert)
        if changed:
            for listener in list(self.listeners):
                listener(changed)
        return changed

    @staticmethod
    def _log(alert: mpb.Alert) -> None:
        event = "metrics.alert_firing" if alert.state == mpb.ALERT_STATE_FIRING else "metrics.alert_resolved"
        (log.warning if alert.state == mpb.ALERT_STATE_FIRING else log.info)(
            event,
            alert_id=alert.alert_id,
            slo=alert.slo,
            model=alert.model,
            tier=alert.tier,
            rule=alert.rule,
            severity=mpb.AlertSeverity.Name(alert.severity),
            burn_rate_threshold=alert.burn_rate_threshold,
            long_burn_rate=round(alert.long_burn_rate, 3),
            short_burn_rate=round(alert.short_burn_rate, 3),
            summary=alert.summary,
        )

    def firing(self, model: str = "") -> list[mpb.Alert]:
        """Every alert firing now (of model, or all)."""
        return [
            obj.alert_proto(a)
            for obj in self.objects.values()
            if not model or obj.model == model
            for a in obj.alerts
            if a.firing
        ]

    def status(self, model: str = "", now: float | None = None, measured=None) -> list[mpb.SloStatus]:
        """Each SLO object's state; measured(obj, window_s, now) gives a latency SLO's measured percentile."""
        now = self._clock() if now is None else now
        windows = sorted(
            {self.config.scaled(w) for r in self.config.rules for w in (r.short_window_s, r.long_window_s)}
        )
        # The percentile is shown over the fastest rule's long window (1 h by default): long enough to hold a
        # tail, short enough to be "now".
        measure_s = min(self.config.scaled(r.long_window_s) for r in self.config.rules)
        out = []
        for name in sorted(self.objects):
            obj = self.objects[name]
            if model and obj.model != model:
                continue
            events, bad = obj.budget_ring.sums(self.config.scaled(obj.spec.period_s), now)
            allowed = (1.0 - obj.spec.objective) * events
            status = mpb.SloStatus(
                slo=obj.proto(),
                events=events,
                bad_events=bad,
                sli=1.0 - bad / events if events else 1.0,
                error_budget_remaining=1.0 - bad / allowed if allowed else 1.0,
                firing=[obj.alert_proto(a) for a in obj.alerts if a.firing],
            )
            for w in windows:
                rate, n, b = obj.burn(w, now)
                status.burn_rates.add(window_s=w, burn_rate=rate, events=n, bad_events=b)
            if measured is not None and obj.spec.kind != "availability":
                status.measured_ms = measured(obj, measure_s, now)
            out.append(status)
        return out

"""Scheduled scaling: declared windows (a cron expression in a time zone, a duration, a minimum count) for
known peaks; while a window is open the model keeps at least its minimum. Cron parsing is croniter's."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from services.autoscaler.policies import Desire, Policy
from services.autoscaler.signals import ModelSignals


@dataclass(frozen=True)
class Window:
    """From every time `cron` fires (in tz) for duration_s, at least `min_replicas`."""

    cron: str
    duration_s: float
    min_replicas: int
    tz: str = "UTC"

    def open_at(self, unix: float) -> bool:
        zone = ZoneInfo(self.tz)
        now = datetime.fromtimestamp(unix, zone)
        # The last firing at or before now (croniter's get_prev is strictly before, so ask from a hair later).
        last = croniter(self.cron, now + timedelta(microseconds=1)).get_prev(datetime)
        return (now - last).total_seconds() < self.duration_s


def parse_window(raw: Any, where: str) -> Window:
    """A window from its config mapping; ValueError naming the field (`where`.cron, ...) on any problem."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must be a mapping with cron, duration_s, min_replicas (tz optional)")
    unknown = set(raw) - {"cron", "duration_s", "min_replicas", "tz"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
    cron = raw.get("cron")
    if not isinstance(cron, str) or not croniter.is_valid(cron):
        raise ValueError(f"{where}.cron: {cron!r} is not a cron expression (e.g. '0 9 * * 1-5')")
    tz = raw.get("tz", "UTC")
    try:
        ZoneInfo(str(tz))
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{where}.tz: unknown time zone {tz!r}") from None
    duration = raw.get("duration_s")
    if not isinstance(duration, (int, float)) or isinstance(duration, bool) or duration <= 0:
        raise ValueError(f"{where}.duration_s: must be a number of seconds > 0, got {duration!r}")
    n = raw.get("min_replicas")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"{where}.min_replicas: must be an integer >= 0, got {n!r}")
    return Window(cron, float(duration), n, str(tz))


class Scheduled(Policy):
    name = "scheduled"

    def __init__(self, windows: list[Window]) -> None:
        self.windows = windows

    @classmethod
    def from_options(cls, options: dict[str, Any], **_: Any) -> Scheduled:
        unknown = set(options) - {"windows"}
        if unknown:
            raise ValueError(f"scheduled: unknown option(s) {sorted(unknown)}; known: ['windows']")
        raw = options.get("windows")
        if not isinstance(raw, list) or not raw:
            raise ValueError("scheduled.windows: must be a non-empty list of windows")
        return cls([parse_window(w, f"scheduled.windows[{i}]") for i, w in enumerate(raw)])

    def desire(self, s: ModelSignals) -> Desire:
        unix = s.now if s.wall_unix is None else s.wall_unix
        open_ = [w for w in self.windows if w.open_at(unix)]
        if not open_:
            return Desire(self.name, None, "", "no window open", {})
        w = max(open_, key=lambda w: w.min_replicas)
        return Desire(
            self.name,
            w.min_replicas,
            "schedule",
            f"window '{w.cron}' ({w.tz}, {w.duration_s:.0f}s) open: at least {w.min_replicas}",
            {"min_replicas": float(w.min_replicas)},
        )

"""Arrival rates from the routers' admitted-request counters (router GetStatus `arrivals`: requests per model and
version since the router started). Every request the fleet must serve passes a router once, when it arrives, so
the rate of these counters is the arrival rate itself: it moves the moment a spike starts, counts requests still
running or queued and those that will fail, where the metrics service's request records (written when a request
ends) lag by a request's whole duration and miss requests still in flight. A router that restarts starts its
counters at zero again; that is a reset, not negative traffic (as Prometheus's rate() treats it)."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

Key = tuple[str, str]  # (model, version); version "" when the router did not assign one


class ArrivalMeter:
    """Counts per (model, version), accumulated over routers and their restarts, sampled at every poll."""

    def __init__(self, keep_s: float = 3600.0) -> None:
        self.keep_s = keep_s
        self._last: dict[tuple[str, Key], int] = {}  # (router, key) -> the router's last raw count
        self._total: dict[Key, float] = {}  # key -> requests seen since this meter started
        self._samples: deque[tuple[float, dict[Key, float]]] = deque()

    def update(self, now: float, counts: Mapping[str, Mapping[Key, int]]) -> None:
        """One poll: router -> its counters now. A router missing from this poll adds nothing (the next poll
        that reaches it catches up on what it counted meanwhile)."""
        for router, by_key in counts.items():
            for key, raw in by_key.items():
                last = self._last.get((router, key))
                # First sight of a counter: the baseline, not traffic (it may count hours before we started).
                delta = 0 if last is None else raw - last if raw >= last else raw
                self._last[(router, key)] = raw
                self._total[key] = self._total.get(key, 0.0) + delta
        self._samples.append((now, dict(self._total)))
        while self._samples and self._samples[0][0] < now - self.keep_s:
            self._samples.popleft()

    def rate(
        self, model: str, window_s: float, version: str | None = None, *, now: float | None = None
    ) -> float | None:
        """Requests/s of a model (of one version of it, when given) over about the last window_s; None until two
        polls at least a second apart lie in the window, or when no router answered within window_s of `now`
        (callers fall back to another source)."""
        if len(self._samples) < 2:
            return None
        last, latest = self._samples[-1]
        if now is not None and now - last > window_s:
            return None
        now = last
        start = next(((t, c) for t, c in self._samples if t >= now - window_s - 1e-9), None)
        if start is None or now - start[0] < 1.0:
            start = self._samples[-2]
            if now - start[0] < 1.0:
                return None
        t0, first = start

        def count(totals: dict[Key, float]) -> float:
            return sum(
                v for (m, ver), v in totals.items() if m == model and (version is None or ver == version)
            )

        return max(0.0, count(latest) - count(first)) / (now - t0)

    def versions(self, model: str) -> set[str]:
        """Versions of a model the routers have counted requests for."""
        return {v for (m, v) in self._total if m == model and v}

"""Arrival rates from the routers' admitted-request counters (router GetStatus `arrivals`: requests per model and
version since the router started). Every request the fleet must serve passes a router once, when it arrives, so
the rate of these counters is the arrival rate itself: it moves the moment a spike starts, counts requests still
running or queued and those that will fail, where the metrics service's request records (written when a request
ends) lag by a request's whole duration and miss requests still in flight. A router that restarts starts its
counters at zero again: each router reports an incarnation (GetStatus arrivals_incarnation, random per process)
beside them, and a new one at the same router key makes the whole new count traffic, exactly, even when the new
process counted past its predecessor's last value before the poll. With the incarnation unchanged (or not
reported: a router from before the field) a count lower than the last is still taken as a reset, not negative
traffic, as Prometheus's rate() does: the only restart sign such a router gives, and one a router with an
unchanged incarnation never shows (its counters only grow), so that rule costs nothing there."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

Key = tuple[str, str]  # (model, version); version "" when the router did not assign one


class ArrivalMeter:
    """Counts per (model, version), accumulated over routers and their restarts, sampled at every poll."""

    def __init__(self, keep_s: float = 3600.0) -> None:
        self.keep_s = keep_s
        self._last: dict[tuple[str, Key], int] = {}  # (router, key) -> the router's last raw count
        self._incarnation: dict[str, str] = {}  # router -> the incarnation its last counts came from
        self._total: dict[Key, float] = {}  # key -> requests seen since this meter started
        self._samples: deque[tuple[float, dict[Key, float]]] = deque()

    def update(
        self,
        now: float,
        counts: Mapping[str, Mapping[Key, int]],
        incarnations: Mapping[str, str] | None = None,
    ) -> None:
        """One poll: router -> its counters now, and router -> the incarnation it reported ("" or missing: not
        reported). A router missing from this poll adds nothing (the next poll that reaches it catches up on what
        it counted meanwhile, or, when it restarted meanwhile, counts the new process's whole count)."""
        for router, by_key in counts.items():
            incarnation = (incarnations or {}).get(router, "")
            before = self._incarnation.get(router)
            self._incarnation[router] = incarnation
            # One process always reports the same incarnation, so any change (to or from "", an upgrade from or a
            # downgrade to a router without the field, included) is a new process at a router seen before: its
            # counters started at zero and all of them is new traffic (a key the old process had and the new one
            # has not counted yet starts again from zero).
            restarted = before is not None and incarnation != before
            if restarted:
                for k in [k for k in self._last if k[0] == router]:
                    self._last[k] = 0
            for key, raw in by_key.items():
                last = self._last.get((router, key))
                if last is None and before is not None:
                    # A counter new at a router polled before (its first request for that model and version,
                    # in this process or a new one): a router never drops a counter, so it was 0 then.
                    last = 0
                # First sight of a router: its counters are the baseline, not traffic (they may count hours before
                # we started). A lower count from the same incarnation: a router without incarnations that
                # restarted (a reset).
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

    def total(self, model: str, version: str | None = None) -> float:
        """Requests of a model (of one version of it, when given) counted since this meter started, over routers
        and their restarts (each counter's first sight is its baseline)."""
        return sum(
            v for (m, ver), v in self._total.items() if m == model and (version is None or ver == version)
        )

    def versions(self, model: str) -> set[str]:
        """Versions of a model the routers have counted requests for."""
        return {v for (m, v) in self._total if m == model and v}

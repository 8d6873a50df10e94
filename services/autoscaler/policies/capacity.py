"""Queue/capacity scaling: replicas from the arrival rate and what one replica sustains within the SLO, not from
a threshold. By Little's law the work in flight is L = lambda x W (arrival rate x time in the system), and a
replica that holds `replica_concurrency` requests within the SLO serves mu = replica_concurrency / W requests/s;
so the fleet needs lambda / mu replicas (plus headroom), and a backlog that has built up is drained within
`drain_s` on top."""

from __future__ import annotations

import math
from typing import Any

from services.autoscaler.policies import Desire, Policy, take
from services.autoscaler.signals import ModelSignals

DEFAULTS: dict[str, Any] = {
    # Requests/s one replica serves within the SLO; 0: from replica_concurrency / the measured mean E2E time.
    "replica_rps": 0.0,
    # Requests one replica holds in flight within the SLO (Little's law with the measured E2E time).
    "replica_concurrency": 0.0,
    # Spare capacity kept above the arrival rate (0.1 = 10%).
    "headroom": 0.1,
    # Hysteresis: fewer replicas only once the need is this fraction below the smaller count's capacity.
    "tolerance": 0.1,
    # A queued backlog is to be drained within this many seconds.
    "drain_s": 30.0,
}


def replica_rate(o: dict[str, Any], s: ModelSignals, fallback_rps: float) -> float:
    """Requests/s one replica sustains within the SLO: configured, else Little's law on the measured E2E time,
    else the fallback (the spec's replica_rps)."""
    if o["replica_rps"]:
        return o["replica_rps"]
    if o["replica_concurrency"] and s.mean_e2e_s > 0:
        return o["replica_concurrency"] / s.mean_e2e_s
    return fallback_rps


def fewer_only_past_tolerance(need: float, current: int, tolerance: float) -> int:
    """ceil(need), except that going below `current` asks for room to spare: ceil(need x (1 + tolerance)), so a
    need wandering around a boundary does not move the count back and forth."""
    want = math.ceil(need - 1e-9)
    if want < current:
        want = min(current, math.ceil(need * (1 + tolerance) - 1e-9))
    return want


class Capacity(Policy):
    name = "capacity"

    def __init__(self, fallback_rps: float, **opts: float) -> None:
        self.fallback_rps = fallback_rps
        self.o = opts

    @classmethod
    def from_options(cls, options: dict[str, Any], *, replica_rps: float, **_: Any) -> Capacity:
        o = take(options, DEFAULTS, cls.name)
        if not (o["replica_rps"] or o["replica_concurrency"] or replica_rps):
            raise ValueError("capacity: needs replica_rps (requests/s one replica serves within the SLO)")
        return cls(replica_rps, **o)

    def desire(self, s: ModelSignals) -> Desire:
        mu = replica_rate(self.o, s, self.fallback_rps)
        if mu <= 0:
            return Desire(self.name, None, "", "replica capacity unknown", {})
        backlog = s.waiting + s.queued
        need = s.arrival_rate * (1 + self.o["headroom"]) / mu + backlog / (mu * self.o["drain_s"])
        want = fewer_only_past_tolerance(need, s.actual, self.o["tolerance"])
        numbers = {
            "arrival_rate": round(s.arrival_rate, 3),
            "replica_rps": round(mu, 3),
            "backlog": float(backlog),
            "needed": round(need, 3),
        }
        reason = f"{s.arrival_rate:.1f} req/s / {mu:.1f} per replica x {1 + self.o['headroom']:.2f}"
        if backlog:
            reason += f" + backlog {backlog} in {self.o['drain_s']:.0f}s"
        return Desire(self.name, want, "arrival_rate", f"{reason} -> {want}", numbers)

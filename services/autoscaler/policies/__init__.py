"""Scaling policies behind one small interface, one module each, chosen by name: each turns a model's signals
into the replica count it asks for and why (the decider takes the largest, within min/max)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from services.autoscaler.signals import ModelSignals


@dataclass(frozen=True, slots=True)
class Desire:
    """What one policy asks for: a replica count (None: no opinion now), the signal that decided it, and the
    numbers behind it (logged and exported with every decision)."""

    policy: str
    replicas: int | None
    signal: str = ""
    reason: str = ""
    numbers: dict[str, float] = field(default_factory=dict)
    #: A policy that has looked ahead (the predictive one: a seasonal forecast over the next cold start) vouches
    #: for an ask below the current count: a scale-down it backs needs only this many seconds of agreement
    #: instead of the model's scale_down_cooldown_s. None: no look-ahead behind this ask.
    down_hold_s: float | None = None
    #: The ask is an alarm (a signal that says the fleet is short now: TTFT p99, queue, KV cache), not a sizing:
    #: a forecast that did not see it coming does not vouch for a quick scale-down for a while after.
    alarm: bool = False


class Policy(ABC):
    """A scaling policy. `desire` is called once per decision with the model's signals; `observe` (optional)
    sees every sample of the arrival rate (the predictive policy keeps history)."""

    name: str = ""

    @abstractmethod
    def desire(self, s: ModelSignals) -> Desire: ...

    def observe(self, now: float, arrival_rate: float) -> None:
        return None


def build(
    name: str, options: dict[str, Any], *, replica_rps: float, default_cold_start_s: float, **shared: Any
) -> Policy:
    """The policy called name, configured from options (unknown options are refused naming the key); `shared`:
    state several policy instances use (the predictive policy's `history`, one per model for all versions)."""
    from services.autoscaler.policies import capacity, predictive, reactive, scheduled

    table = {
        "reactive": reactive.Reactive,
        "capacity": capacity.Capacity,
        "scheduled": scheduled.Scheduled,
        "predictive": predictive.Predictive,
    }
    if name not in table:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(table))}")
    return table[name].from_options(
        options, replica_rps=replica_rps, default_cold_start_s=default_cold_start_s, **shared
    )


AVAILABLE = ("reactive", "capacity", "scheduled", "predictive")


def take(options: dict[str, Any], known: dict[str, Any], policy: str) -> dict[str, Any]:
    """options over known defaults; an unknown key or a value of the wrong type is a ValueError naming it."""
    unknown = set(options) - set(known)
    if unknown:
        raise ValueError(f"{policy}: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
    out = dict(known)
    for k, v in options.items():
        default = known[k]
        if isinstance(default, bool) or default is None or isinstance(default, (list, str)):
            out[k] = v
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ValueError(f"{policy}.{k}: must be a number, got {v!r}")
        if v < 0:
            raise ValueError(f"{policy}.{k}: must be >= 0, got {v}")
        out[k] = float(v)
    return out

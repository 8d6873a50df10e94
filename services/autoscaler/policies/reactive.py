"""Reactive scaling on what the engines report now: replicas in proportion to how far the worst signal is from
its target (Kubernetes HPA's rule, desired = ceil(current x metric / target)), with a tolerance band so that
small deviations change nothing. Utilisation (running requests or output tokens/s per replica) can move the count both ways; queue
depth, KV-cache use and TTFT p99 only ever add replicas (an empty queue says nothing about how many are
needed)."""

from __future__ import annotations

import math
from typing import Any

from services.autoscaler.policies import Desire, Policy, take
from services.autoscaler.signals import ModelSignals

DEFAULTS: dict[str, Any] = {
    # Requests running per replica that the replica sustains within the SLO (0: signal off).
    "target_running_per_replica": 64.0,
    # Output tokens/s per replica at the wanted utilisation (0: off). Unlike running requests, which grow
    # faster than the load near saturation (Little's law with a rising latency), this grows with the load.
    "target_output_tokens_per_s": 0.0,
    # Requests waiting (engines' queues + router admission queue) per replica before adding replicas.
    "target_waiting_per_replica": 4.0,
    # KV-cache use of the fullest replica before adding replicas (0: off).
    "target_kv_usage": 0.9,
    # TTFT p99 objective in ms; above it, replicas are added in proportion (0: off).
    "ttft_slo_ms": 0.0,
    # No change while every signal is within this fraction of its target.
    "tolerance": 0.1,
}


class Reactive(Policy):
    name = "reactive"

    def __init__(self, **opts: float) -> None:
        self.o = opts

    @classmethod
    def from_options(cls, options: dict[str, Any], **_: Any) -> Reactive:
        o = take(options, DEFAULTS, cls.name)
        if o["tolerance"] >= 1:
            raise ValueError("reactive.tolerance: must be below 1")
        return cls(**o)

    def desire(self, s: ModelSignals) -> Desire:
        o = self.o
        if s.serving == 0:
            # Nothing runs, so nothing is measured: one replica if anything waits (the decider wakes it).
            return Desire(self.name, 1 if s.demand else None, "demand", "no serving replica", {})
        n = s.serving
        both: dict[str, float] = {}
        up_only: dict[str, float] = {}
        if o["target_running_per_replica"]:
            both["running_per_replica"] = s.running / n / o["target_running_per_replica"]
        if o["target_output_tokens_per_s"]:
            both["output_tokens_per_s"] = s.output_tokens_per_s / n / o["target_output_tokens_per_s"]
        if o["target_waiting_per_replica"]:
            up_only["waiting_per_replica"] = (s.waiting + s.queued) / n / o["target_waiting_per_replica"]
        if o["target_kv_usage"]:
            up_only["kv_usage"] = s.kv_usage / o["target_kv_usage"]
        if o["ttft_slo_ms"] and s.ttft_p99_ms:
            up_only["ttft_p99"] = s.ttft_p99_ms / o["ttft_slo_ms"]
        ratios = dict(both)
        ratios.update({k: v for k, v in up_only.items() if v > 1 + o["tolerance"]})
        if not ratios:
            return Desire(self.name, None, "", "no signal configured", {})
        signal, ratio = max(ratios.items(), key=lambda kv: kv[1])
        numbers = {
            "serving": float(n),
            "ratio": round(ratio, 3),
            **{k: round(v, 3) for k, v in ratios.items()},
        }
        if abs(ratio - 1) <= o["tolerance"]:
            return Desire(self.name, n, signal, f"{signal} within tolerance ({ratio:.2f}x target)", numbers)
        want = max(1, math.ceil(n * ratio))
        reason = f"{signal} at {ratio:.2f}x target: {n} -> {want}"
        return Desire(self.name, want, signal, reason, numbers, alarm=signal in up_only)

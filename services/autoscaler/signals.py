"""What the autoscaler sees of one model (or one version of it) at one decision: replicas, their load, demand and
latency, and the cold starts it has measured. Filled from the registry, routers and metrics service (live) or the
fleet model (bench)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ModelSignals:
    """One model's state at time `now` (seconds on the decider's clock; wall time where schedules matter)."""

    now: float
    #: Replicas registered and SERVING (routable).
    serving: int
    #: Replicas asked for but not serving yet (cold starting).
    starting: int = 0
    #: Requests the engines report running and waiting, summed over the serving replicas.
    running: int = 0
    waiting: int = 0
    #: Requests waiting in the routers' admission queues (no replica could take them yet; wakes from zero).
    queued: int = 0
    #: Highest KV-cache use of a serving replica (0..1).
    kv_usage: float = 0.0
    #: Output tokens per second over the serving replicas.
    output_tokens_per_s: float = 0.0
    #: Arrival rate (requests/s) over the recent window, and the mean end-to-end time of a request (s).
    arrival_rate: float = 0.0
    mean_e2e_s: float = 0.0
    #: TTFT p99 over the recent window, in ms (0: unknown).
    ttft_p99_ms: float = 0.0
    #: Cold starts measured for this model (seconds, most recent last).
    cold_starts_s: tuple[float, ...] = field(default_factory=tuple)
    #: Unix time, for schedules (defaults to `now` when the clock is wall time).
    wall_unix: float | None = None
    #: This version's share of the model's arrivals (rollouts split a model's traffic between versions): the
    #: predictive policy forecasts the model and asks for this share of it. 1 without rollouts.
    share: float = 1.0

    @property
    def actual(self) -> int:
        """Replicas that exist (serving or starting)."""
        return self.serving + self.starting

    @property
    def in_flight(self) -> int:
        """Requests in the system: running and waiting at the engines, queued at the routers."""
        return self.running + self.waiting + self.queued

    @property
    def demand(self) -> bool:
        """Anything to serve at all (scale-to-zero stays at zero without it; a waiting request wakes a model)."""
        return self.in_flight > 0 or self.arrival_rate > 0

    def cold_start_s(self, default_s: float) -> float:
        """The cold start to plan with: the longest of the recent measurements (a late replica costs more than
        an early one), else default_s."""
        recent = self.cold_starts_s[-5:]
        return max(recent) if recent else default_s

"""A fleet of simulated replicas on a virtual clock (one tick per second) for scaling experiments: arrivals from
a trace wait in one FIFO (the routers' admission queue) and are served by the replicas that are up, each replica
behaving as its measured response curve says (loadtest/autoscale_model.py); a new replica serves only after its
cold start; a replica scaled down leaves the routable set at once and is paid for until its requests drained.
The autoscaler's own decider and policies (services/autoscaler) decide, fed the signals the live service would
see. Also: the oracle that knows the future trace, and a static fleet sized for the peak."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from loadtest.autoscale_model import ReplicaModel
from services.autoscaler.decider import Decider
from services.autoscaler.signals import ModelSignals

SIGNAL_WINDOW_S = 30  # arrival rate and TTFT p99 as the metrics service would report them: over the last 30 s


@dataclass
class Timeline:
    """Per-second series of one run, and the scale events."""

    arrivals: np.ndarray
    ok: np.ndarray  # requests that met the SLO, by arrival second
    late: np.ndarray  # served, but past the SLO, by arrival second
    dropped: np.ndarray  # waited past their deadline, by arrival second
    serving: np.ndarray
    replicas: np.ndarray  # paid for: booting + serving + draining
    desired: np.ndarray
    ttft_p99_ms: np.ndarray
    events: list[tuple[int, int, int, str]] = field(default_factory=list)  # (t, from, to, reason)


class Fleet:
    """Replica lifecycles and the FIFO of waiting requests."""

    def __init__(
        self,
        model: ReplicaModel,
        cold_start_s: float,
        deadline_s: float,
        initial: int,
        *,
        cancel_booting_first=True,
    ) -> None:
        self.model = model
        # An autoscaler cancels a start before it drains a serving replica (a start it may need again costs a
        # cold start either way); a plan that knows the future drains the serving one (its starts are for later).
        self.cancel_booting_first = cancel_booting_first
        self.cold = int(round(cold_start_s))
        self.deadline = int(deadline_s)
        self.booting: list[int] = []  # ready_at per booting replica (oldest first)
        self.serving = initial
        self.draining: list[int] = []  # gone_at per draining replica
        self.queue: deque[list[int]] = deque()  # [arrival second, count]
        self.cold_starts: list[float] = []

    @property
    def existing(self) -> int:
        return len(self.booting) + self.serving

    def scale_to(self, t: int, desired: int, drain_s: float) -> None:
        while self.existing < desired:
            self.booting.append(t + self.cold)
        while self.existing > desired:
            if self.booting and (self.cancel_booting_first or not self.serving):
                self.booting.pop()  # the newest start
            else:
                self.serving -= 1
                self.draining.append(t + max(1, math.ceil(drain_s)))

    def tick(self, t: int) -> None:
        ready = [r for r in self.booting if r <= t]
        if ready:
            self.booting = [r for r in self.booting if r > t]
            self.serving += len(ready)
            self.cold_starts.extend(float(self.cold) for _ in ready)
        self.draining = [d for d in self.draining if d > t]


def simulate(
    rates: np.ndarray,
    model: ReplicaModel,
    decide: Callable[[int, ModelSignals], int],
    *,
    cold_start_s: float,
    initial: int,
    decision_interval_s: int = 10,
    deadline_s: float = 60.0,
    seed: int = 0,
    observe: Callable[[int, float], None] | None = None,
    arrivals: np.ndarray | None = None,
    cancel_booting_first: bool = True,
) -> Timeline:
    """Run the fleet through the per-second arrival rates; decide(t, signals) returns the desired replicas."""
    n = len(rates)
    if arrivals is None:
        arrivals = np.random.default_rng(seed).poisson(np.maximum(rates, 0.0))
    ok = np.zeros(n)
    late = np.zeros(n)
    dropped = np.zeros(n)
    serving = np.zeros(n, dtype=np.int32)
    replicas = np.zeros(n, dtype=np.int32)
    desired_s = np.zeros(n, dtype=np.int32)
    ttft = np.zeros(n)
    served = np.zeros(n)
    out_tokens = model.workload.output_tokens
    fleet = Fleet(model, cold_start_s, deadline_s, initial, cancel_booting_first=cancel_booting_first)
    desired = initial
    events: list[tuple[int, int, int, str]] = []
    slo_ms = model.slo.ttft_ms
    mu_max = model.rps_max
    point = model.at(0.0)
    for t in range(n):
        fleet.tick(t)
        a = int(arrivals[t])
        if a:
            fleet.queue.append([t, a])
        # Serve in arrival order up to what the serving replicas can take this second.
        cap = fleet.serving * mu_max
        served_now = 0
        worst_wait = 0
        budget = cap
        q = fleet.queue
        while q and budget >= 1:
            at, count = q[0]
            take = min(count, int(budget))
            wait = t - at
            if wait == 0:
                served_now += take
            else:
                late[at] += take  # it waited a whole second or more: past any sub-second TTFT objective
                worst_wait = max(worst_wait, wait)
            budget -= take
            if take == count:
                q.popleft()
            else:
                q[0][1] = count - take
        served[t] = cap - budget
        if fleet.serving:
            point = model.at((cap - budget) / fleet.serving)
            ok[t] += served_now * point.attainment
            late[t] += served_now * (1 - point.attainment)
        # Requests that waited past their deadline give up (DEADLINE_EXCEEDED at the client).
        while q and t - q[0][0] >= fleet.deadline:
            at, count = q.popleft()
            dropped[at] += count
        backlog = sum(c for _, c in q)
        ttft[t] = worst_wait * 1000.0 + point.ttft_p99_ms if worst_wait or backlog else point.ttft_p99_ms
        if backlog and not fleet.serving:
            ttft[t] = max(ttft[t], (t - q[0][0]) * 1000.0 + slo_ms)
        if observe is not None:
            observe(t, float(a))
        if t % decision_interval_s == 0:
            lo = max(0, t - SIGNAL_WINDOW_S + 1)
            window_rate = float(arrivals[lo : t + 1].mean())
            s = ModelSignals(
                now=float(t),
                serving=fleet.serving,
                starting=len(fleet.booting),
                running=int(round(fleet.serving * point.mean_in_flight)) if fleet.serving else 0,
                waiting=0,
                queued=backlog,
                arrival_rate=window_rate,
                output_tokens_per_s=float(served[lo : t + 1].mean()) * out_tokens,
                mean_e2e_s=point.mean_e2e_s if math.isfinite(point.mean_e2e_s) else 0.0,
                ttft_p99_ms=float(ttft[lo : t + 1].max()),
                cold_starts_s=tuple(fleet.cold_starts[-5:]),
            )
            new = decide(t, s)
            if new != desired:
                events.append((t, desired, new, ""))
                desired = new
            fleet.scale_to(t, desired, point.mean_e2e_s if math.isfinite(point.mean_e2e_s) else 5.0)
        serving[t] = fleet.serving
        replicas[t] = fleet.existing + len(fleet.draining)
        desired_s[t] = desired
    return Timeline(arrivals.astype(float), ok, late, dropped, serving, replicas, desired_s, ttft, events)


def autoscaler(decider: Decider, *, rate_sample_s: int = 10) -> tuple[Callable, Callable]:
    """decide/observe callbacks driving the real decider: it sees a rate sample every rate_sample_s seconds
    (what a live autoscaler polling the metrics service gets) and decides at every decision tick."""
    buf: list[float] = []

    def observe(t: int, arrivals: float) -> None:
        buf.append(arrivals)
        if len(buf) >= rate_sample_s:
            decider.observe(float(t), sum(buf) / len(buf))
            buf.clear()

    def decide(t: int, s: ModelSignals) -> int:
        return decider.decide(s).desired

    return decide, observe


def needed(rates: np.ndarray, rps_at_slo: float) -> np.ndarray:
    """Replicas each second needs: what the oracle, knowing the trace's future rates (not the coin flips of
    each second's Poisson arrivals), provisions so that a second's arrivals stay within the replicas' SLO rate
    but for a 3-sigma Poisson excess (rate + 3 sqrt(rate))."""
    r = np.maximum(rates, 0.0)
    return np.maximum(1, np.ceil((r + 3 * np.sqrt(r)) / rps_at_slo - 1e-9)).astype(np.int32)


def oracle_plan(need: np.ndarray, cold_start_s: float) -> np.ndarray:
    """The fewest replica-seconds that have need[t] replicas serving at every t, given that a replica costs its
    cold start before it serves: replica k (the k-th of the fleet) runs through every stretch where need >= k,
    started cold_start_s ahead, and is kept through gaps shorter than a cold start (cheaper than a restart).
    Returns the replicas that exist (booting or serving) per second."""
    n = len(need)
    cold = int(round(cold_start_s))
    plan = np.zeros(n, dtype=np.int32)
    for k in range(1, int(need.max()) + 1):
        on = need >= k
        idx = np.flatnonzero(on)
        if not len(idx):
            continue
        # Stretches of consecutive seconds, then merged across short gaps.
        breaks = np.flatnonzero(np.diff(idx) > 1)
        starts = np.concatenate(([idx[0]], idx[breaks + 1]))
        ends = np.concatenate((idx[breaks], [idx[-1]]))
        merged: list[list[int]] = []
        for s, e in zip(starts, ends, strict=True):
            if merged and s - merged[-1][1] - 1 <= cold:
                merged[-1][1] = e
            else:
                merged.append([int(s), int(e)])
        for s, e in merged:
            plan[max(0, s - cold) : e + 1] += 1
    return plan


def flaps(events: list[tuple[int, int, int, str]], window_s: float) -> int:
    """Direction reversals within window_s: a scale-up followed by a scale-down (or the reverse) that soon."""
    count = 0
    for (t0, a0, b0, _), (t1, a1, b1, _) in zip(events, events[1:], strict=False):
        if (b0 > a0) != (b1 > a1) and t1 - t0 < window_s:
            count += 1
    return count

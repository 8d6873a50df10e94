"""One model's (or one version's) scaling decisions: the largest count its policies ask for, within min/max, held
back by cooldowns and a scale-down stabilisation window (so it never flaps), with scale to zero after an idle
period, an immediate wake when a request waits for a model at zero, and the retirement of a version no traffic
goes to any more. Every decision says which policy, which signal and the numbers behind it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from services.autoscaler.policies import Desire, Policy
from services.autoscaler.signals import ModelSignals
from services.autoscaler.spec import ModelSpec

UP, DOWN, HOLD = "up", "down", "hold"


@dataclass(frozen=True, slots=True)
class Bounds:
    """The limits of one decision: min/max, whether the last replica may go when idle, and a retirement (the
    version leaves the fleet: held at its count until `retire_due`, then drained to zero)."""

    min_replicas: int
    max_replicas: int
    scale_to_zero: bool = False
    retiring: bool = False
    retire_due: bool = False
    #: Why (the rollout behind a retirement), for the decision's reason.
    why: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    """A decision for one model (one version of it) at `at`: from `previous` desired replicas to `desired`."""

    model: str
    at: float
    previous: int
    desired: int
    actual: int
    direction: str
    policy: str
    signal: str
    reason: str
    numbers: dict[str, float] = field(default_factory=dict)
    # Every policy's ask (policy -> replicas or None), for the log line and `fleetserve status`.
    asks: dict[str, int | None] = field(default_factory=dict)
    version: str = ""

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "version": self.version,
            "at": round(self.at, 3),
            "previous": self.previous,
            "desired": self.desired,
            "actual": self.actual,
            "direction": self.direction,
            "policy": self.policy,
            "signal": self.signal,
            "reason": self.reason,
            "numbers": self.numbers,
            "asks": self.asks,
        }


class Decider:
    """Holds one model's (one version's) desired count between decisions."""

    def __init__(
        self,
        spec: ModelSpec,
        policies: list[Policy] | None = None,
        *,
        initial: int | None = None,
        version: str = "",
    ) -> None:
        self.spec = spec
        self.version = version
        self.policies = policies if policies is not None else spec.build_policies()
        self.desired = spec.min_replicas if initial is None else initial
        self._last_up = float("-inf")
        self._last_change = float("-inf")
        self._idle_since: float | None = None
        # When an alarm (reactive's TTFT/queue/KV signals) last raised the count.
        self._last_alarm_up = float("-inf")
        # (time, recommendation) over the scale-down window: a scale-down goes only as low as the highest.
        self._recent: deque[tuple[float, int]] = deque()

    def observe(self, now: float, arrival_rate: float) -> None:
        """Feed an arrival-rate sample to the policies that keep history (the predictive one)."""
        for p in self.policies:
            p.observe(now, arrival_rate)

    def bounds(self) -> Bounds:
        """The spec's own bounds (a model without versions)."""
        return Bounds(self.spec.min_replicas, self.spec.max_replicas, self.spec.scale_to_zero)

    def decide(self, s: ModelSignals, bounds: Bounds | None = None) -> Decision:
        spec = self.spec
        b = bounds or self.bounds()
        if b.retiring:
            return self._retire(s, b)
        asks = [p.desire(s) for p in self.policies]
        opinions = [d for d in asks if d.replicas is not None]
        winner = (
            max(opinions, key=lambda d: d.replicas)
            if opinions
            else Desire("none", None, "", "no policy asked")
        )
        raw = winner.replicas if winner.replicas is not None else self.desired
        policy, signal, reason = winner.policy, winner.signal, winner.reason

        # Scale to zero only after idle_s without demand (min_replicas 0 needs scale_to_zero): until then, and
        # whenever there is demand, at least one replica.
        if s.demand:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = s.now
        idle_for = 0.0 if self._idle_since is None else s.now - self._idle_since
        if b.scale_to_zero and not s.demand and (idle_for >= spec.idle_s or self.desired == 0):
            # (Already at zero, e.g. at start: nothing to wake for, so nothing starts.)
            target, policy, signal = 0, "scale_to_zero", "idle"
            reason = f"no request for {idle_for:.0f}s (idle_s {spec.idle_s:.0f})"
        else:
            target = min(b.max_replicas, max(b.min_replicas, 1, raw))

        now = s.now
        self._recent.append((now, target))
        while self._recent and self._recent[0][0] < now - spec.scale_down_cooldown_s:
            self._recent.popleft()
        previous = self.desired
        new = previous
        if self.desired == 0 and s.demand:
            # Wake on demand: a request is waiting for a model with no replica; no cooldown applies. (A version
            # that is new, a rollout's candidate say, starts the same way, under its policy's name.)
            new = max(1, target)
            if b.scale_to_zero:
                policy, signal = "wake", "queued" if s.queued else "arrivals"
                reason = f"request waiting for a model at zero ({s.in_flight} in flight): {new}"
        elif target > previous:
            if now - self._last_up >= spec.scale_up_cooldown_s:
                new = target if not spec.max_step_up else min(target, previous + spec.max_step_up)
            else:
                reason += f" (held: scale-up cooldown {spec.scale_up_cooldown_s:.0f}s)"
        elif target < previous:
            # The scale-down stabilisation window: the model's cooldown, or less where a forecast that looked a
            # cold start ahead says the load is gone (holding replicas for a past peak then only costs: if load
            # returns after the horizon, a replica started then is in time).
            hold, backed = spec.scale_down_cooldown_s, ""
            vouched = [
                d
                for d in asks
                if d.down_hold_s is not None and d.replicas is not None and d.replicas < previous
            ]
            # Not within the plain window after an alarm raised the count (a TTFT alarm, say): the forecast missed
            # something then, so it does not vouch for taking those replicas back quickly.
            if now - self._last_alarm_up < spec.scale_down_cooldown_s:
                vouched = []
            if vouched and min(d.down_hold_s for d in vouched) < hold:
                hold = min(d.down_hold_s for d in vouched)
                backed = f", {vouched[0].policy}-backed"
            stable = max(r for t, r in self._recent if t >= now - hold)
            if now - self._last_change >= hold and stable < previous:
                new = stable
                if stable > target:
                    reason += f" (to {stable}: highest ask over the last {hold:.0f}s{backed})"
                elif backed:
                    reason += f" (stable for {hold:.0f}s{backed})"
            else:
                reason += f" (held: scale-down window {hold:.0f}s{backed})"
        if new > previous and winner.alarm:
            self._last_alarm_up = now
        return self._commit(
            s, new, policy, signal, reason, dict(winner.numbers), {d.policy: d.replicas for d in asks}
        )

    def _retire(self, s: ModelSignals, b: Bounds) -> Decision:
        """A version no traffic goes to: its count held until the retirement is due, then zero (the provisioner
        drains each replica before it stops it)."""
        self._recent.clear()
        self._idle_since = None
        new = 0 if b.retire_due else self.desired
        reason = f"retired: {b.why}" if b.retire_due else f"retiring (held until due): {b.why}"
        return self._commit(s, new, "retire", "rollout", reason, {}, {})

    def _commit(
        self,
        s: ModelSignals,
        new: int,
        policy: str,
        signal: str,
        reason: str,
        numbers: dict[str, float],
        asks: dict[str, int | None],
    ) -> Decision:
        previous = self.desired
        direction = UP if new > previous else DOWN if new < previous else HOLD
        if direction != HOLD:
            self._last_change = s.now
            if direction == UP:
                self._last_up = s.now
        self.desired = new
        return Decision(
            model=self.spec.model,
            at=s.now,
            previous=previous,
            desired=new,
            actual=s.actual,
            direction=direction,
            policy=policy,
            signal=signal,
            reason=reason,
            numbers=numbers,
            asks=asks,
            version=self.version,
        )

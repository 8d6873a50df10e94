"""One circuit breaker per replica, the retry budget per model, and their metrics."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog
from opentelemetry import metrics

from services.router.router_metrics import RouterMetrics
from shared.resilience import BreakerState, CircuitBreaker, RetryBudget

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """How every replica's breaker behaves."""

    failure_threshold: int = 3
    open_s: float = 5.0
    max_open_s: float = 60.0


class ReplicaBreakers:
    """Breakers by replica id, created on first use and forgotten when the replica leaves; the retry budget of
    each model. Reports breaker state as a gauge and every transition as a counter and a log line."""

    def __init__(
        self,
        settings: BreakerSettings,
        meter: metrics.Meter,
        budget_max_tokens: float = 50.0,
        budget_token_ratio: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        prom: RouterMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.prom = prom
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}
        self._models: dict[str, str] = {}
        self._budgets: dict[str, RetryBudget] = {}
        self._budget_args = (budget_max_tokens, budget_token_ratio)
        self._transitions = meter.create_counter(
            "fleetserve.router.breaker_transitions",
            unit="{transition}",
            description="Circuit breaker state changes, by replica and new state.",
        )
        meter.create_observable_gauge(
            "fleetserve.router.breaker_state",
            callbacks=[self._observe],
            description="Circuit breaker state per replica: 0 closed, 1 half-open, 2 open.",
        )

    def get(self, replica_id: str, model: str = "") -> CircuitBreaker:
        b = self._breakers.get(replica_id)
        if b is None:
            s = self.settings

            def on_change(old: BreakerState, new: BreakerState, rid: str = replica_id) -> None:
                self._transitions.add(1, {"fleetserve.replica_id": rid, "fleetserve.breaker_state": new.name})
                if self.prom is not None:
                    self.prom.breaker(rid, model, new)
                    self.prom.breaker_changed(rid, new)
                log.warning("router.breaker_changed", replica=rid, old=old.name, new=new.name)

            b = CircuitBreaker(
                s.failure_threshold, s.open_s, s.max_open_s, clock=self._clock, on_change=on_change
            )
            self._breakers[replica_id] = b
            self._models[replica_id] = model
            if self.prom is not None:
                self.prom.breaker(replica_id, model, b.state)
        return b

    def allows(self, replica_id: str) -> bool:
        b = self._breakers.get(replica_id)
        return b is None or b.allows()

    def peek(self, replica_id: str) -> CircuitBreaker | None:
        """The replica's breaker if it has one (no breaker yet means closed)."""
        return self._breakers.get(replica_id)

    def remove(self, replica_id: str) -> None:
        self._breakers.pop(replica_id, None)
        model = self._models.pop(replica_id, None)
        if self.prom is not None and model is not None:
            self.prom.replica_left(replica_id, model)

    def budget(self, model: str) -> RetryBudget:
        """The retry budget of model (one bucket per model: a failing pool does not throttle another's retries)."""
        b = self._budgets.get(model)
        if b is None:
            b = self._budgets[model] = RetryBudget(*self._budget_args)
        return b

    def budgets(self) -> Iterable[tuple[str, RetryBudget]]:
        return sorted(self._budgets.items())

    def min_open_left(self, replica_ids: Iterable[str]) -> float | None:
        """Shortest time until one of these replicas' open breakers lets a probe through (None if none is open)."""
        lefts = [b.open_seconds_left() for rid in replica_ids if (b := self._breakers.get(rid)) is not None]
        lefts = [x for x in lefts if x > 0]
        return min(lefts) if lefts else None

    def _observe(self, options):
        for rid, b in list(self._breakers.items()):
            yield metrics.Observation(
                int(b.current()),
                {"fleetserve.replica_id": rid, "fleetserve.model": self._models.get(rid, "")},
            )

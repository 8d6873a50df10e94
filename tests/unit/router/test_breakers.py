"""The router's breaker board: a breaker per replica, a retry budget per model, metrics of both."""

from __future__ import annotations

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from services.router.breakers import BreakerSettings, ReplicaBreakers
from shared.resilience import BreakerState


class Clock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


def board(clock: Clock) -> tuple[ReplicaBreakers, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    return ReplicaBreakers(BreakerSettings(failure_threshold=1, open_s=2), meter, 4, 0.5, clock=clock), reader


def points(reader: InMemoryMetricReader, name: str) -> list[tuple[dict, float]]:
    out = []
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == name:
                    out += [(dict(p.attributes), p.value) for p in m.data.data_points]
    return out


def test_breakers_are_per_replica_and_reported_as_gauge_and_transitions():
    """One replica's faults open only its breaker; the gauge reports 2 (open) for it and 0 for the other;
    the transition is counted with the new state."""
    clock = Clock()
    b, reader = board(clock)
    b.get("r1", "m").on_fault()
    b.get("r2", "m")
    assert not b.allows("r1") and b.allows("r2") and b.allows("never-seen")
    gauge = {a["fleetserve.replica_id"]: v for a, v in points(reader, "fleetserve.router.breaker_state")}
    assert gauge == {"r1": int(BreakerState.OPEN), "r2": int(BreakerState.CLOSED)}
    transitions = points(reader, "fleetserve.router.breaker_transitions")
    assert [(a["fleetserve.replica_id"], a["fleetserve.breaker_state"], v) for a, v in transitions] == [
        ("r1", "OPEN", 1)
    ]


def test_min_open_left_and_remove():
    """min_open_left is the soonest half-open time among open breakers; a removed replica starts afresh."""
    clock = Clock()
    b, _ = board(clock)
    b.get("r1", "m").on_fault()
    clock.now += 0.5
    b.get("r2", "m").on_fault()
    assert b.min_open_left(["r1", "r2"]) == 1.5
    assert b.min_open_left(["r3"]) is None
    b.remove("r1")
    assert b.allows("r1") and b.peek("r1") is None


def test_retry_budget_is_per_model():
    """Failures of one model's pool spend only that model's budget."""
    b, _ = board(Clock())
    for _ in range(3):
        b.budget("bad").on_failure()
    assert not b.budget("bad").can_retry()
    assert b.budget("good").can_retry()
    assert [m for m, _ in b.budgets()] == ["bad", "good"]

"""The router's Prometheus instruments: requests by status, attempts by outcome, retries and mid-stream resumes,
hedges, the retry budget's refusals, circuit breaker states, kv_aware's KV-event streams and the admission
queue. Recorded as events happen (per request or attempt, never per chunk) so that worker processes of one
router can merge them."""

from __future__ import annotations

from prometheus_client.registry import CollectorRegistry

from shared import prom
from shared.resilience import BreakerState

_TIERS = {1: "interactive", 2: "standard", 3: "batch"}


def tier_name(priority: int) -> str:
    """The tier label of a common.v1.Priority (unspecified runs as standard)."""
    return _TIERS.get(priority, "standard")


class RouterMetrics:
    """Series labelled model_name (the model after alias resolution); breaker series also by replica (the fleet's
    replicas, forgotten when they leave)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = prom.counter(
            "fleetserve:router_requests",
            "Requests the router finished, by model and gRPC status code.",
            ("model_name", "code"),
            registry,
        )
        self.attempts = prom.counter(
            "fleetserve:router_attempts",
            "Engine calls, by outcome: ok, fault (the replica's), backpressure, client (the caller's error).",
            ("model_name", "outcome"),
            registry,
        )
        self.retries = prom.counter(
            "fleetserve:router_retries",
            "Further attempts after a failed one, by kind: retry (before the first token) or resume (after it).",
            ("model_name", "kind"),
            registry,
        )
        self.throttled = prom.counter(
            "fleetserve:router_retries_throttled",
            "Retries and resumes the model's retry budget refused.",
            ("model_name",),
            registry,
        )
        self.hedges = prom.counter(
            "fleetserve:router_hedges",
            "Hedged attempts: sent, and won (the hedge's first token came first).",
            ("model_name", "result"),
            registry,
        )
        self.breaker_state = prom.gauge(
            "fleetserve:router_breaker_state",
            "Circuit breaker state per replica: 0 closed, 1 half-open, 2 open (a router's worker processes "
            "combine to the worst).",
            ("replica", "model_name"),
            registry,
            multiprocess_mode="livemax",
        )
        self.breaker_transitions = prom.counter(
            "fleetserve:router_breaker_transitions",
            "Circuit breaker state changes per replica, by the state entered.",
            ("replica", "state"),
            registry,
        )
        self.kv_events_state = prom.gauge(
            "fleetserve:router_kv_events_state",
            "KV-event stream of each replica a kv_aware policy follows: 0 synced, 1 connecting or retrying, "
            "2 off (the engine publishes none: start vLLM engines with --vllm-kv-events; kv_aware scores the "
            "replica by load alone). A router's worker processes combine to the worst.",
            ("replica", "model_name"),
            registry,
            multiprocess_mode="livemax",
        )
        self.queue_waiting = prom.gauge(
            "fleetserve:router_queue_waiting",
            "Requests waiting in the router's admission queue (only with --max-in-flight-per-replica).",
            ("model_name", "tier"),
            registry,
        )
        self.queue_time = prom.histogram(
            "fleetserve:router_queue_time_seconds",
            "Time requests waited in the router's admission queue before an attempt could start.",
            ("model_name", "tier"),
            registry,
            prom.REQUEST_LATENCY_BUCKETS,
        )

    def breaker(self, replica: str, model: str, state: BreakerState) -> None:
        """A breaker exists or changed state."""
        self.breaker_state.labels(replica, model).set(int(state))

    def breaker_changed(self, replica: str, state: BreakerState) -> None:
        self.breaker_transitions.labels(replica, state.name.lower()).inc()

    def kv_events(self, replica: str, model: str, state: int | None) -> None:
        """A followed replica's KV-event stream changed state (kv_index.KvStreamState); None: no longer followed."""
        if state is None:
            try:
                self.kv_events_state.remove(replica, model)
            except KeyError:
                pass
        else:
            self.kv_events_state.labels(replica, model).set(int(state))

    def replica_left(self, replica: str, model: str) -> None:
        """Forget a replica that left the fleet (replica ids come and go with scaling: no series left behind)."""
        for metric, labels in (
            (self.breaker_state, (replica, model)),
            *((self.breaker_transitions, (replica, s.name.lower())) for s in BreakerState),
        ):
            try:
                metric.remove(*labels)
            except KeyError:
                pass

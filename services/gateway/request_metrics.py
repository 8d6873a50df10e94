"""The gateway's Prometheus instruments: what clients experience per request (TTFT, TPOT, E2E, status, tokens,
limits hit, shed requests), recorded once per request when it ends; nothing per token."""

from __future__ import annotations

import grpc
from prometheus_client import Counter, Gauge
from prometheus_client.registry import CollectorRegistry

from shared import prom

# Every request of a model the fleet does not serve (or that failed before the model was checked) is counted
# under this label: model names come from clients, and a label per made-up name would grow without bound.
UNKNOWN_MODEL = "unknown"
NO_TENANT = "none"
SHED_REASON = "LOAD_SHED"
_TIERS = {1: "interactive", 2: "standard", 3: "batch"}


class GatewayMetrics:
    """Request-level series, labelled model_name (and tenant, when tenant_label is on: one series set per
    tenant of the database, so only where the number of tenants is modest)."""

    def __init__(self, registry: CollectorRegistry, *, tenant_label: bool = False) -> None:
        self.registry = registry
        self.tenant_label = tenant_label
        labels = ("model_name", "tenant") if tenant_label else ("model_name",)
        self.requests = prom.counter(
            "fleetserve:requests",
            "Requests that ended, by model and gRPC status code (HTTP requests by the code they map from).",
            (*labels, "code"),
            registry,
        )
        self.ttft = prom.histogram(
            "fleetserve:time_to_first_token_seconds",
            "Time from the request's arrival at the gateway to its first token leaving it.",
            labels,
            registry,
            prom.TTFT_BUCKETS,
        )
        self.tpot = prom.histogram(
            "fleetserve:request_time_per_output_token_seconds",
            "Per request: (end - first token) / (output tokens - 1), for requests with 2 or more tokens.",
            labels,
            registry,
            prom.TPOT_BUCKETS,
        )
        self.e2e = prom.histogram(
            "fleetserve:e2e_request_latency_seconds",
            "Time from arrival to the end of the stream, of requests that finished OK.",
            labels,
            registry,
            prom.REQUEST_LATENCY_BUCKETS,
        )
        self.prompt_tokens = prom.counter(
            "fleetserve:prompt_tokens", "Prompt tokens of requests that finished OK.", labels, registry
        )
        self.cached_tokens = prom.counter(
            "fleetserve:prompt_tokens_cached",
            "Prompt tokens served from an engine's prefix cache, of requests that finished OK.",
            labels,
            registry,
        )
        self.generation_tokens = prom.counter(
            "fleetserve:generation_tokens", "Output tokens of requests that finished OK.", labels, registry
        )
        self.running = prom.gauge(
            "fleetserve:num_requests_running",
            "Requests being served by the gateway now (admitted or not yet decided).",
            ("model_name",),
            registry,
        )
        self.limited = prom.counter(
            "fleetserve:limited_requests",
            "Requests refused by a tenant or key limit or budget, by limit (the ErrorInfo reason).",
            ("model_name", "limit"),
            registry,
        )
        self.shed = prom.counter(
            "fleetserve:shed_requests",
            "Requests refused by load shedding (LOAD_SHED), by the tier they ran at.",
            ("model_name", "tier"),
            registry,
        )
        self.degraded = prom.counter(
            "fleetserve:degraded_requests",
            "Requests served degraded under load (a smaller model or capped max_tokens).",
            ("model_name",),
            registry,
        )
        self.refusals = prom.counter(
            "fleetserve:safety_refusals",
            "Requests refused by the safety filter, by reason (SAFETY_INPUT_BLOCKED, SAFETY_OUTPUT_BLOCKED).",
            ("model_name", "reason"),
            registry,
        )

        # Bound children per label set: labels() takes a lock and builds a key on every call, ~1 us each, eight
        # times a request; a dict lookup here is one.
        self._series: dict[tuple[str, ...], _Series] = {}

        self._running: dict[str, Gauge] = {}

    def _running_child(self, model_label: str) -> Gauge:
        child = self._running.get(model_label)
        if child is None:
            child = self._running[model_label] = self.running.labels(model_label)
        return child

    def started(self, model_label: str) -> None:
        """A request of a served model began (the model is known by now: the label set stays bounded)."""
        self._running_child(model_label).inc()

    def stopped(self, model_label: str) -> None:
        """The request counted by started(model_label) ended."""
        self._running_child(model_label).dec()

    def finished(
        self,
        *,
        model_label: str,
        tenant: str,
        code: grpc.StatusCode,
        reason: str,
        priority: int,
        e2e_s: float,
        ttft_s: float | None,
        prompt_tokens: int | None,
        cached_tokens: int | None,
        completion_tokens: int | None,
        degraded: bool,
    ) -> None:
        """Record one request that ended."""
        labels = (model_label, tenant or NO_TENANT) if self.tenant_label else (model_label,)
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = _Series(self, labels)
        series.requests(code.name).inc()
        if ttft_s is not None:
            series.ttft.observe(ttft_s)
            if completion_tokens is not None and completion_tokens >= 2:
                series.tpot.observe(max(0.0, e2e_s - ttft_s) / (completion_tokens - 1))
        if code == grpc.StatusCode.OK:
            series.e2e.observe(e2e_s)
            if prompt_tokens:
                series.prompt_tokens.inc(prompt_tokens)
            if cached_tokens:
                series.cached_tokens.inc(cached_tokens)
            if completion_tokens:
                series.generation_tokens.inc(completion_tokens)
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason:
            if reason == SHED_REASON:
                self.shed.labels(model_label, _TIERS.get(priority, "standard")).inc()
            else:
                self.limited.labels(model_label, reason).inc()
        if degraded:
            self.degraded.labels(model_label).inc()

    def refused(self, model_label: str, reason: str) -> None:
        """A safety-filter refusal."""
        self.refusals.labels(model_label, reason).inc()


class _Series:
    """One label set's children of the per-request instruments (as many as label sets: bounded likewise)."""

    __slots__ = (
        "_counter",
        "_labels",
        "_by_code",
        "ttft",
        "tpot",
        "e2e",
        "prompt_tokens",
        "cached_tokens",
        "generation_tokens",
    )

    def __init__(self, m: GatewayMetrics, labels: tuple[str, ...]) -> None:
        self._counter, self._labels = m.requests, labels
        self._by_code: dict[str, Counter] = {}
        self.ttft = m.ttft.labels(*labels)
        self.tpot = m.tpot.labels(*labels)
        self.e2e = m.e2e.labels(*labels)
        self.prompt_tokens = m.prompt_tokens.labels(*labels)
        self.cached_tokens = m.cached_tokens.labels(*labels)
        self.generation_tokens = m.generation_tokens.labels(*labels)

    def requests(self, code: str) -> Counter:
        """The request counter's child for this label set and gRPC code (17 codes at most)."""
        child = self._by_code.get(code)
        if child is None:
            child = self._by_code[code] = self._counter.labels(*self._labels, code)
        return child

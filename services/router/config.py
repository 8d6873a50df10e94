"""Router settings: where the registry is, which policy picks replicas, and how failover behaves."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from services.router import policies
from services.router.model_routing import DEFAULT_KEYWORDS
from services.router.policy_set import parse_mapping
from shared.settings import RegistryWatchSettings, WorkerSettings, advertised_address, service_config


class RouterSettings(RegistryWatchSettings, WorkerSettings):
    """Settings of the router (flags --kebab-case, env FLEETSERVE_ROUTER_<FIELD>)."""

    model_config = service_config("router")

    registry_address: str = Field(
        "127.0.0.1:7001",
        min_length=1,
        description="host:port of the registry whose replicas the router watches.",
    )
    router_id: str = Field(
        "",
        description="This router's id in the registry (gateways discover routers there); empty: "
        "router-<host>-<port>.",
    )
    advertise_host: str = Field(
        "",
        description="Host gateways reach this router at (registered as advertise-host:port; on Kubernetes the "
        "pod IP); default: --host, or this machine's hostname when --host is a wildcard (0.0.0.0).",
    )
    register_in_registry: bool = Field(
        True, description="Register in the registry as a router, so gateways with --router-discovery find it."
    )
    policy: str = Field(
        "least_load", description="Default routing policy by name (see services/router/policies)."
    )
    model_policies: str = Field(
        "", description="Policy per model, overriding --policy: 'model=policy,...' (e.g. 'sim-1b=kv_aware')."
    )
    policy_options: str = Field(
        "",
        description="Weights and thresholds: 'policy.param=number,...', e.g. 'cache_aware.min_match=0.6,"
        "kv_aware.prefill_weight=2,load.kv_usage=4' (load.* weighs every policy's load score).",
    )
    model_aliases: str = Field(
        "", description="Model aliases resolved per request: 'alias=small-model|large-model,...'."
    )
    model_route_max_prompt_tokens: int = Field(
        1024, ge=0, description="Model routing: prompts longer than this go to the alias's large model."
    )
    model_route_max_output_tokens: int = Field(
        512, ge=0, description="Model routing: max_tokens above this goes to the alias's large model."
    )
    model_route_keywords: str = Field(
        ",".join(DEFAULT_KEYWORDS),
        description="Model routing: comma-separated words that mark a prompt as hard (the large model).",
    )
    model_route_classifier: str = Field(
        "",
        description="Model routing: 'module:function' deciding (hard, why) per request, instead of the rule.",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=10,
        description="Most replicas one request is tried on when they fail before the first token.",
    )
    unroutable_cooldown_s: float = Field(
        2.0, ge=0, le=300, description="How long a replica that failed a request stays out of rotation."
    )
    forget_model_after_s: float = Field(
        600.0,
        gt=0,
        description="A model whose replicas have all left is still listed (its requests: UNAVAILABLE with a "
        "retry delay, as while it restarts) for this long; after it, it is decommissioned: NOT_FOUND. Models "
        "that wake on demand are always listed.",
    )
    default_timeout_s: float = Field(
        120.0, gt=0, description="Timeout given to the engine when the caller sent no deadline."
    )
    ready_wait_s: float = Field(
        2.0,
        ge=0,
        description="How long a request waits for the first registry snapshot after the router starts.",
    )
    # -- resilience (retries, resume, breakers, hedging, outliers, admission) --
    retry_backoff_base_s: float = Field(
        0.01, ge=0, description="Backoff before retry n: full jitter in [0, min(max, base * 2**n)]."
    )
    retry_backoff_max_s: float = Field(0.5, ge=0, description="Longest backoff between two attempts.")
    retry_budget_max_tokens: float = Field(
        50.0,
        gt=0,
        description="Retry budget per model (gRPC retry throttling): bucket size; each failed attempt takes "
        "1, retries only while more than half is left.",
    )
    retry_budget_token_ratio: float = Field(
        0.1, gt=0, description="Retry budget: tokens a successful request gives back."
    )
    resume: Literal["reproducible", "always", "off"] = Field(
        "reproducible",
        description="Mid-stream failover: resume on another replica for greedy or seeded generations "
        "(reproducible), for every generation (always), or never (off).",
    )
    coalesce: bool = Field(
        True,
        description="When a caller reads slower than its replica streams, merge the chunks waiting for it "
        "into one message (never holding one back when the caller is ready); off: one message per chunk.",
    )
    breaker_failure_threshold: int = Field(
        3, ge=1, description="Consecutive replica faults that open a replica's circuit breaker."
    )
    breaker_open_s: float = Field(
        5.0, ge=0, description="How long an opened breaker stays open before a half-open probe."
    )
    breaker_max_open_s: float = Field(
        60.0, ge=0, description="Cap of the open period, which doubles each time a probe fails."
    )
    max_in_flight_per_replica: int = Field(
        0,
        ge=0,
        description="Admission: most attempts this router keeps in flight per replica; more wait in the "
        "router's queue (interactive first, fair across tenants). 0: no cap, engines queue.",
    )
    frontend_pack: int = Field(
        8,
        ge=0,
        description="Replicas with several front-end processes: a request goes to the first front end (in the "
        "replica's order) with fewer than this many of this router's attempts in flight, else to the least busy "
        "(fewer front ends busy at light load: fewer engine-core output messages per step). On an H200 at 32 "
        "streams, 8 gave a first token 10.5 ms sooner (p50, paired median of 7 runs) and +2.6% tokens/s over 32, "
        "which put every stream on one front end. 0: in turn. With --workers N each worker packs its share, "
        "ceil(this / N), so that the router as a whole fills a front end with this many.",
    )
    queue_max_waiting: int = Field(
        1000, ge=0, description="Admission: most requests waiting per model; more get RESOURCE_EXHAUSTED."
    )
    queue_retry_after_s: float = Field(
        1.0, ge=0, description="Admission: retry delay advised (RetryInfo) when the queue is full."
    )
    wake_models: str = Field(
        "",
        description="Comma-separated models that may have no replica for a while (the autoscaler scales them to "
        "zero or is starting them): a request for one waits in the admission queue, within its deadline, until "
        "a replica serves, instead of failing; the autoscaler sees it waiting and starts one.",
    )
    hedge_delay_s: float = Field(
        0.0,
        ge=0,
        description="Hedging: when a replica has sent no token after this long, send the request to a second "
        "replica too and keep whichever answers first (0: off).",
    )
    hedge_delays: str = Field(
        "", description="Hedging per model, overriding --hedge-delay-s: 'model=seconds,...' (0 turns it off)."
    )
    outlier_detection: bool = Field(
        False,
        description="Eject replicas whose TTFT or error rate is far worse than their peers' for a while.",
    )
    outlier_min_samples: int = Field(
        10, ge=1, description="Outliers: samples a replica and its peers need before it is judged."
    )
    outlier_min_peers: int = Field(
        2, ge=1, description="Outliers: other replicas of the model needed for a comparison."
    )
    outlier_ttft_factor: float = Field(
        3.0, gt=1, description="Outliers: ejected when its TTFT average exceeds this times the peers' median."
    )
    outlier_ttft_min_gap_ms: float = Field(
        50.0, ge=0, description="Outliers: ... and exceeds the median by at least this many ms."
    )
    outlier_error_rate_gap: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Outliers: ejected when its error rate exceeds the peers' median by this.",
    )
    outlier_eject_s: float = Field(
        30.0, gt=0, description="Outliers: first ejection time; each further one lasts this much longer."
    )
    outlier_max_ejected_fraction: float = Field(
        0.5, ge=0, le=1, description="Outliers: most of a model's replicas ejected at once (rounded down)."
    )

    stall_detection: bool = Field(
        True,
        description="Hung replicas: end the streams of a replica that has sent no chunk on any of them for "
        "longer than its threshold, take it out of rotation and resume them on other replicas.",
    )
    stall_min_silence_s: float = Field(
        1.0, gt=0, description="Stalls: silence of a streaming replica that counts as hung, at least."
    )
    stall_itl_factor: float = Field(
        20.0, gt=1, description="Stalls: ... or this many times the replica's recent inter-chunk interval."
    )
    stall_first_token_s: float = Field(
        2.5,
        gt=0,
        description="Stalls: silence of a replica whose requests all wait for a first token, at least.",
    )
    stall_ttft_factor: float = Field(
        10.0, gt=1, description="Stalls: ... or this many times the replica's recent time to first token."
    )
    stall_check_interval_s: float = Field(0.1, gt=0, description="Stalls: how often silences are checked.")
    stall_probe_after_s: float = Field(
        0.5,
        gt=0,
        description="Stalls: a replica with requests in flight silent this long is asked for its progress "
        "(GetLoad) and gets no new request until it answers.",
    )
    stall_probe_timeout_s: float = Field(
        1.25,
        gt=0,
        description="Stalls: a progress probe unanswered this long, with no chunk meanwhile, is a hang.",
    )
    stall_probe_streaming_s: float = Field(
        0.2,
        gt=0,
        description="Stalls: a replica that was streaming is probed sooner, after this much silence or "
        "--stall-probe-itl-factor times its recent inter-chunk interval, whichever is longer (at most "
        "--stall-probe-after-s).",
    )
    stall_probe_itl_factor: float = Field(
        10.0, gt=1, description="Stalls: ... this many times the replica's recent inter-chunk interval."
    )

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        if v not in policies.available():
            raise ValueError(f"unknown policy {v!r}; available: {', '.join(policies.available())}")
        return v

    @property
    def frontend_pack_per_worker(self) -> int:
        """This process's share of --frontend-pack: workers pack independently, so N workers at the whole pack
        each would put N times as many streams on a replica's first front end (seen on an H200: 4 router workers
        put all 128 streams on one of 4 front ends, at 0.92 of a core)."""
        return -(-self.frontend_pack // self.worker_count)

    @property
    def wake_model_set(self) -> frozenset[str]:
        return frozenset(m.strip() for m in self.wake_models.split(",") if m.strip())

    def hedge_delay_by_model(self) -> tuple[tuple[str, float], ...]:
        """--hedge-delays parsed: (model, seconds) pairs."""
        try:
            pairs = parse_mapping(self.hedge_delays)
        except ValueError as e:
            raise ValueError(f"hedge_delays: {e}") from None
        out = []
        for model, secs in pairs.items():
            try:
                delay = float(secs)
            except ValueError:
                raise ValueError(f"hedge_delays: delay of {model!r} must be a number, got {secs!r}") from None
            if not delay >= 0:
                raise ValueError(f"hedge_delays: delay of {model!r} must be >= 0")
            out.append((model, delay))
        return tuple(out)

    @model_validator(mode="after")
    def _routing_tables(self) -> RouterSettings:
        # Parsed here so that a typo fails at start with the field's name, not on the first request.
        from services.router import model_routing, policy_set

        for model, name in policy_set.parse_mapping(self.model_policies).items():
            if name not in policies.available():
                raise ValueError(f"model_policies: unknown policy {name!r} for model {model!r}")
        policy_set.validate_options(policy_set.parse_policy_options(self.policy_options))
        self.hedge_delay_by_model()
        model_routing.parse_aliases(self.model_aliases)
        if self.model_route_classifier:
            model_routing.load_classifier(self.model_route_classifier)
        return self

    def advertised_address(self, port: int) -> str:
        """The host:port to register for this router bound on port."""
        return advertised_address(self.host, self.advertise_host, port)

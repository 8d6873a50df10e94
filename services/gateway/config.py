"""Gateway settings: where the router is, the tenants database, deadlines, input limits, rate-limit backend,
prices, safety rules and load shedding."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from services.gateway.db import check_url
from shared.settings import WorkerSettings, service_config


class GatewaySettings(WorkerSettings):
    """Settings of the gateway (flags --kebab-case, env FLEETSERVE_GATEWAY_<FIELD>)."""

    model_config = service_config("gateway")

    router_address: str = Field(
        "127.0.0.1:7003",
        description="host:port of the router, or several comma-separated (each request goes to one, by "
        "affinity, failing over to the others); may be empty with --registry-address.",
    )
    registry_address: str = Field(
        "",
        description="The registry (a gRPC target; several: ipv4:a:1,b:2): the routers registered there are "
        "used too, as they come and go (router discovery); empty: only --router-address.",
    )
    embedded_router: bool = Field(
        False,
        description="Run a full router (membership, policies, breakers, KV index, versions, hedging, engine "
        "resume) inside each gateway worker process instead of calling router processes: one gRPC hop fewer "
        "(less CPU per token, lower TTFT), but routers no longer scale apart from gateways and each worker has "
        "its own routing state (docs/deployment.md). --router-address is then unused; the router's settings "
        "are --router-flags and FLEETSERVE_ROUTER_* env.",
    )
    router_flags: str = Field(
        "",
        description="With --embedded-router: the router's own flags, as `python -m services.router` takes them "
        "(e.g. '--policy cache_aware --port 7013'); its --registry-address and TLS default to this gateway's. "
        "It serves RouterService (GetStatus for the autoscaler) on its --host/--port (0: a free one, in the "
        "ready file as router_address) and registers there as a router.",
    )
    router_resume: Literal["reproducible", "always", "off"] = Field(
        "reproducible",
        description="When a router dies mid-stream, resume through another router for greedy or seeded "
        "generations (reproducible), for all (always), or end the stream with the error (off).",
    )
    coalesce: bool = Field(
        True,
        description="When a client reads slower than its router streams, merge the chunks waiting for it into "
        "one message or SSE event (never holding one back when the client is ready); off: one per chunk.",
    )
    router_down_s: float = Field(
        2.0, gt=0, le=300, description="How long a router that did not answer is passed over."
    )
    db_path: str = Field(
        "gateway.db",
        min_length=1,
        description="SQLite file with tenants, (hashed) API keys and the usage ledger; created if missing "
        "(unused with --db-url).",
    )
    db_url: str = Field(
        "",
        description="Database of tenants, keys, limits, budgets, the usage ledger, batch jobs and feedback: "
        "postgresql://user:password@host:port/dbname is shared by every gateway pointed at it; "
        "sqlite:///path is a local file. Empty: the SQLite files --db-path and --jobs-db-path.",
    )
    db_pool_size: int = Field(
        10, ge=1, le=200, description="Most connections to a PostgreSQL --db-url this gateway opens."
    )
    bootstrap_api_key: str = Field(
        "",
        description="API key of the 'dev' tenant created on first start. A secret: only from the environment "
        "(FLEETSERVE_GATEWAY_BOOTSTRAP_API_KEY), never a flag. Empty (and no --bootstrap-api-key-file): a "
        "generated key is printed once to the terminal, never to the log.",
        json_schema_extra={"secret": True},
    )
    bootstrap_api_key_file: str = Field(
        "",
        description="File holding the dev tenant's API key (e.g. a mounted Secret); if it does not exist, a "
        "generated key is written there, mode 0600.",
    )
    auth_cache_ttl_s: float = Field(
        5.0,
        ge=0,
        le=300,
        description="How long a key lookup is cached; a revocation applies within this time.",
    )
    default_deadline_s: float = Field(
        120.0, gt=0, description="Deadline applied to requests whose client set none."
    )
    default_max_tokens: int = Field(256, ge=1, description="max_tokens used when a request sends 0.")
    max_tokens_limit: int = Field(8192, ge=1, description="Largest max_tokens a request may ask for.")
    list_models_timeout_s: float = Field(
        5.0, gt=0, description="Timeout of the router call behind ListModels."
    )
    config_poll_s: float = Field(
        1.0,
        gt=0,
        le=300,
        description="How often the tenants database's config version is checked; a change made with "
        "`fleetserve admin` (limits, keys, models) applies within this time, whatever auth_cache_ttl_s is.",
    )
    max_request_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description="Largest request message accepted; bigger ones are refused (RESOURCE_EXHAUSTED) before "
        "they are parsed.",
    )
    redis_url: str = Field(
        "",
        description="redis://host:port/db shared by every gateway for rate limits and stream caps; empty: "
        "limits are kept in this process (one gateway).",
    )
    redis_timeout_s: float = Field(
        0.5,
        gt=0,
        description="Socket connect and reply timeout of each Redis call; a call that exceeds it counts as Redis "
        "unreachable (that request is checked against the in-process fallback, 3 in a row open the breaker).",
    )
    limits_fallback_gateways: int = Field(
        0,
        ge=0,
        description="While Redis is unreachable each gateway enforces 1/N of every limit; N is this, or with "
        "0 the number of gateways seen: alive in the gateway database's presence table (read during the outage "
        "too), plus those last seen in Redis's presence set that the database does not say left.",
    )
    limits_fallback_unknown_gateways: int = Field(
        2,
        ge=1,
        description="N while nothing is known (no presence read from Redis or the gateway database yet, and "
        "limits_fallback_gateways 0): a conservative guess rather than 1, which would let every gateway grant "
        "the whole limit; logged once (gateway.limits_fleet_size_unknown) and exported as the metric "
        "fleetserve:limits_fallback_gateways_unknown.",
    )
    model_prices: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description='USD per 1M prompt and completion tokens per model, JSON: {"sim-1b": [0.1, 0.4]}; '
        "unpriced models cost 0 (cost budgets).",
    )
    context_lengths: dict[str, int] = Field(
        default_factory=dict,
        description='Context length (prompt + max_tokens) per model, JSON: {"sim-1b": 4096}.',
    )
    default_context_length: int = Field(
        4096, ge=16, description="Context length of models not in context_lengths."
    )
    models_cache_ttl_s: float = Field(
        2.0, ge=0, description="How long the router's model list is cached for the unknown-model check."
    )
    extra_models: list[str] = Field(
        default_factory=list,
        description="Model names the router resolves without listing them (aliases); not refused as unknown.",
    )
    ledger_flush_interval_s: float = Field(
        0.5, gt=0, description="How often usage rows are written to the ledger (one transaction each time)."
    )
    budget_refresh_s: float = Field(
        2.0,
        ge=0,
        description="How often a tenant's period usage is re-read from the ledger (other gateways' rows).",
    )
    budget_hold_s: float = Field(
        30.0,
        gt=0,
        description="A budgeted request's hold (what it may still use) lasts this long unless its gateway renews "
        "it (every third of it): the holds of a gateway that died stop counting after this.",
    )
    ledger_sync: Literal["auto", "on", "off"] = Field(
        "auto",
        description="on: commit a request's usage row before its last chunk goes to the client (a gateway killed "
        "then loses no billed row; the client resumes elsewhere and is billed there); auto: on with PostgreSQL "
        "(several gateways), off with SQLite.",
    )
    safety_input_patterns: list[str] = Field(
        default_factory=list,
        description="Regular expressions (case-insensitive); a prompt matching one is refused "
        "(SAFETY_INPUT_BLOCKED).",
    )
    safety_output_patterns: list[str] = Field(
        default_factory=list,
        description="Regular expressions checked on the generated text (sliding window); a match ends the "
        "stream (SAFETY_OUTPUT_BLOCKED). Empty: output is relayed as bytes, unchecked.",
    )
    safety_window_chars: int = Field(
        256, ge=1, description="Output check window: how much earlier text a match may span."
    )
    shed_batch_queue_depth: float = Field(
        0.0,
        ge=0,
        description="Shed batch requests while a model has this many queued requests per routable replica "
        "(router queue + engines waiting); 0: never.",
    )
    shed_standard_queue_depth: float = Field(
        0.0, ge=0, description="The same for standard requests (set it above the batch one); 0: never."
    )
    shed_poll_s: float = Field(0.5, gt=0, description="How often the router's load is read for shedding.")
    degrade_models: dict[str, str] = Field(
        default_factory=dict,
        description='Instead of shedding, serve with a smaller model, JSON: {"big": "small"}.',
    )
    degrade_max_tokens: int = Field(
        0, ge=0, description="Instead of shedding, cap max_tokens at this; 0: no cap."
    )
    metrics_tenant_label: bool = Field(
        False,
        description="Label the Prometheus request series with the tenant id as well (one series set per "
        "tenant: turn on only where the tenants are few enough).",
    )
    # -- protocols: OpenAI-compatible HTTP, batch jobs ---------------------------------------------------
    http_port: int = Field(
        0,
        ge=-1,
        le=65535,
        description="Port of the OpenAI-compatible HTTP server (on --host); 0 picks a free one, -1 turns it off.",
    )
    jobs_db_path: str = Field(
        "",
        description="SQLite file of batch jobs and feedback; empty: gateway-jobs.db beside --db-path.",
    )
    feedback_index_size: int = Field(
        100_000,
        ge=1,
        le=10_000_000,
        description="Requests remembered for Feedback (tenant check, model/version/arm labels; ~170 B each): "
        "feedback on an older request is still stored, unlabelled.",
    )
    job_concurrency: int = Field(4, ge=1, le=1024, description="Items of one batch job generated at once.")
    job_tenant_concurrency: int = Field(
        8, ge=1, le=4096, description="Batch items of one tenant generated at once, over all its jobs."
    )
    job_max_items: int = Field(10_000, ge=1, description="Most items one SubmitBatch may carry.")
    job_item_attempts: int = Field(
        5,
        ge=1,
        le=100,
        description="Tries per batch item on UNAVAILABLE (and limits that advise no short wait) before it fails.",
    )
    job_lease_s: float = Field(
        15.0,
        ge=1.0,
        le=3600,
        description="How long a gateway's claim on a batch item lasts without renewal (renewed every third of "
        "it): after a gateway dies, its items run elsewhere within this time.",
    )
    job_poll_s: float = Field(
        1.0,
        gt=0,
        le=300,
        description="How often a gateway looks for batch items to run (jobs submitted to other gateways, items "
        "left by a gateway that died).",
    )
    job_item_max_wait_s: float = Field(
        3600.0,
        ge=0,
        description="How long in all a batch item may sit out rate limits and load shedding before it fails.",
    )

    @field_validator("db_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        return check_url(value)

    def router_addresses(self) -> list[str]:
        """--router-address as a list."""
        return [a.strip() for a in self.router_address.split(",") if a.strip()]

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> GatewaySettings:
        if self.router_flags and not self.embedded_router:
            raise ValueError("router_flags configure the embedded router: they need embedded_router")
        if not self.router_addresses() and not self.registry_address and not self.embedded_router:
            raise ValueError("router_address is empty and no registry_address discovers routers")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit ({self.max_tokens_limit})"
            )
        if 0 < self.shed_standard_queue_depth < self.shed_batch_queue_depth:
            raise ValueError(
                f"shed_standard_queue_depth ({self.shed_standard_queue_depth}) is below shed_batch_queue_depth "
                f"({self.shed_batch_queue_depth}): batch must be shed first"
            )
        for name in ("safety_input_patterns", "safety_output_patterns"):
            for pattern in getattr(self, name):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"{name}: {pattern!r} is not a regular expression: {e}") from None
        for model, prices in self.model_prices.items():
            if any(not p >= 0 for p in prices):
                raise ValueError(f"model_prices[{model!r}]: prices must be >= 0; got {prices}")
        return self

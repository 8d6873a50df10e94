"""Gateway settings: where the router is, the tenants database, deadlines and input limits."""

from __future__ import annotations

from pydantic import Field, model_validator

from shared.settings import ServiceSettings, service_config


class GatewaySettings(ServiceSettings):
    """Settings of the gateway (flags --kebab-case, env FLEETSERVE_GATEWAY_<FIELD>)."""

    model_config = service_config("gateway")

    router_address: str = Field("127.0.0.1:7003", min_length=1, description="host:port of the router.")
    db_path: str = Field(
        "gateway.db",
        min_length=1,
        description="SQLite file with tenants and (hashed) API keys; created if missing.",
    )
    bootstrap_api_key: str = Field(
        "",
        description="API key of the 'dev' tenant created on first start; empty: generate one and log it once.",
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
    # -- protocols: OpenAI-compatible HTTP, batch jobs ---------------------------------------------------
    http_port: int = Field(
        0,
        ge=-1,
        le=65535,
        description="Port of the OpenAI-compatible HTTP server (on --host); 0 picks a free one, -1 turns it off.",
    )
    http_max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest HTTP request body; bigger ones get 413 unread."
    )
    jobs_db_path: str = Field(
        "",
        description="SQLite file of batch jobs and feedback; empty: gateway-jobs.db beside --db-path.",
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
        description="Tries per batch item on retryable errors (rate limits, UNAVAILABLE) before it fails.",
    )

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> GatewaySettings:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit ({self.max_tokens_limit})"
            )
        return self

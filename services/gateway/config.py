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

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> GatewaySettings:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit ({self.max_tokens_limit})"
            )
        return self

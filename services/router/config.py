"""Router settings: where the registry is, which policy picks replicas, and how failover behaves."""

from __future__ import annotations

from pydantic import Field, field_validator

from services.router import policies
from shared.settings import ServiceSettings, service_config


class RouterSettings(ServiceSettings):
    """Settings of the router (flags --kebab-case, env FLEETSERVE_ROUTER_<FIELD>)."""

    model_config = service_config("router")

    registry_address: str = Field(
        "127.0.0.1:7001",
        min_length=1,
        description="host:port of the registry whose replicas the router watches.",
    )
    policy: str = Field("least_load", description="Routing policy by name (see services/router/policies).")
    max_attempts: int = Field(
        3,
        ge=1,
        le=10,
        description="Most replicas one request is tried on when they fail before the first token.",
    )
    unroutable_cooldown_s: float = Field(
        2.0, ge=0, le=300, description="How long a replica that failed a request stays out of rotation."
    )
    default_timeout_s: float = Field(
        120.0, gt=0, description="Timeout given to the engine when the caller sent no deadline."
    )
    watch_backoff_base_s: float = Field(
        0.1, gt=0, description="First reconnect delay (full jitter, doubling) when the registry watch breaks."
    )
    watch_backoff_max_s: float = Field(
        5.0, gt=0, description="Longest reconnect delay for the registry watch."
    )
    watch_resubscribe_s: float = Field(
        600.0,
        gt=0,
        description="Timeout of one registry watch; the router then resubscribes (fresh snapshot).",
    )
    ready_wait_s: float = Field(
        2.0,
        ge=0,
        description="How long a request waits for the first registry snapshot after the router starts.",
    )

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        if v not in policies.available():
            raise ValueError(f"unknown policy {v!r}; available: {', '.join(policies.available())}")
        return v

"""Registry settings: where membership is stored, lease length, heartbeat cadence and watcher buffering."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from shared.settings import ServiceSettings, service_config


class RegistrySettings(ServiceSettings):
    """Settings of the registry (flags --kebab-case, env FLEETSERVE_REGISTRY_<FIELD>)."""

    model_config = service_config("registry")

    store: Literal["sqlite", "etcd"] = Field(
        "sqlite",
        description="Where membership and control-plane documents live: sqlite (embedded, one registry) or "
        "etcd (--etcd-endpoint; several registries share it and either can die).",
    )
    etcd_endpoint: str = Field(
        "127.0.0.1:2379",
        description="With --store etcd: host:port of etcd's client (gRPC) endpoint, or of every member of an etcd "
        "cluster, comma-separated (a,b,c): the registry talks to one and moves to the next when it fails.",
    )
    etcd_prefix: str = Field(
        "/fleetserve/",
        min_length=1,
        description="With --store etcd: key prefix of this fleet (fleets sharing an etcd use different ones).",
    )
    db_path: str = Field(
        "registry.db",
        min_length=1,
        description="SQLite file holding the membership across restarts; ':memory:' keeps nothing (tests).",
    )
    lease_ttl_s: float = Field(
        3.0, gt=0, le=3600, description="A replica with no heartbeat for this long is removed."
    )
    heartbeat_interval_s: float = Field(
        1.0, gt=0, description="How often replicas are told to heartbeat; must be well under lease_ttl_s."
    )
    persist_interval_s: float = Field(
        2.0,
        gt=0,
        le=300,
        description="How often heartbeat load is written to the database in one batch (membership changes "
        "are written at once).",
    )
    watch_queue_size: int = Field(
        1024,
        ge=1,
        description="Events buffered per watcher; a watcher that falls further behind gets a fresh snapshot.",
    )

    metrics_address: str = Field(
        "",
        description="host:port of the metrics service whose numbers rollout guardrails and A/B analyses read; "
        "empty: rollouts never advance on guardrails they cannot judge, and experiments cannot be analysed.",
    )
    rollout_interval_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="How often the rollout controller judges guardrails and moves plans along.",
    )

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> RegistrySettings:
        # One late heartbeat must not cost a healthy replica its lease.
        if self.heartbeat_interval_s >= self.lease_ttl_s:
            raise ValueError(
                f"heartbeat_interval_s ({self.heartbeat_interval_s}) must be less than lease_ttl_s "
                f"({self.lease_ttl_s}), or every replica's lease would lapse between heartbeats"
            )
        return self

    @property
    def reaper_interval_s(self) -> float:
        """How often expired leases are looked for: a quarter of the lease, so removal lags expiry little."""
        return self.lease_ttl_s / 4

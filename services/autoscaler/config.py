"""Autoscaler settings: where the fleet's registry, routers and metrics are, which models scale how (--models),
how often it decides, and where replicas come from (--provisioner)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from services.autoscaler.spec import ModelSpec, parse_models
from shared.settings import RegistryWatchSettings, ServiceSettings, service_config


class AutoscalerSettings(RegistryWatchSettings, ServiceSettings):
    """Settings of the autoscaler (flags --kebab-case, env FLEETSERVE_AUTOSCALER_<FIELD>)."""

    model_config = service_config("autoscaler")

    registry_address: str = Field(
        "127.0.0.1:7001", min_length=1, description="Registry (gRPC target; several: ipv4:a:1,b:2)."
    )
    router_addresses: str = Field(
        "", description="Routers whose admission queues are read (comma-separated host:port); empty: none."
    )
    router_discovery: bool = Field(
        False,
        description="Also read the routers registered in the registry (role ROUTER), looked up every round: "
        "routers that come back on new ports, and gateways' embedded routers (gateway --embedded-router).",
    )
    metrics_address: str = Field(
        "", description="Metrics service for arrival rate, TTFT p99 and E2E time; empty: engines' load only."
    )
    models: str = Field(
        ...,
        min_length=1,
        description='Per-model scaling as JSON, or a .json file: {"sim-1b": {"min_replicas": 1, "max_replicas": 4, '
        '"policies": {"capacity": {}, "reactive": {}}, "replica_rps": 40, ...}} (docs/autoscaling.md).',
    )
    interval_s: float = Field(10.0, gt=0, le=3600, description="Seconds between decisions.")
    window_s: float = Field(
        30.0, gt=0, le=3600, description="Arrival rate and TTFT p99 are measured over this many seconds."
    )
    provisioner: Literal["local", "external"] = Field(
        "local",
        description="local: start and stop engine processes on this machine; external: only decide and export "
        "the desired count (Kubernetes: KEDA reads fleetserve:autoscaler_desired_replicas, infra/k8s/).",
    )
    engine_args: str = Field(
        "",
        description="local provisioner: extra flags for every engine it starts (shell-quoted), e.g. "
        "'--speed-factor 5 --startup-s 10'.",
    )
    data_dir: str = Field(
        ".", description="local provisioner: where engines' ready files (run/) and logs (logs/) go."
    )
    drain_timeout_s: float = Field(
        60.0,
        ge=0,
        description="Scale-down: how long a drained replica may take to finish its streams before it is stopped "
        "(it is then SIGTERMed and finishes within its own grace period).",
    )
    start_timeout_s: float = Field(
        600.0,
        gt=0,
        description="local provisioner: how long an engine it started may stay out of the registry (cold start, or "
        "a lost lease) and still count toward the desired count; past it the engine is stopped and a new one "
        "started. Longer than the slowest cold start (vLLM: model load + compile).",
    )
    decisions_kept: int = Field(10, ge=1, le=1000, description="Decisions per model kept for status.")

    @model_validator(mode="after")
    def _models_parse(self) -> AutoscalerSettings:
        self.specs  # noqa: B018 - a bad spec fails here, at start, naming the field
        return self

    @property
    def specs(self) -> list[ModelSpec]:
        return parse_models(self.models)

    @property
    def routers(self) -> list[str]:
        return [a.strip() for a in self.router_addresses.split(",") if a.strip()]

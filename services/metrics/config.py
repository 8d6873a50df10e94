"""Metrics collector settings: how many spans and per-model request records are kept."""

from __future__ import annotations

from pydantic import Field

from shared.settings import ServiceSettings, service_config


class MetricsSettings(ServiceSettings):
    """Settings of the metrics collector (flags --kebab-case, env FLEETSERVE_METRICS_<FIELD>)."""

    model_config = service_config("metrics")

    max_spans: int = Field(
        200_000, ge=1, le=50_000_000, description="Spans kept for GetTrace; the oldest are evicted first."
    )
    max_records_per_model: int = Field(
        100_000,
        ge=1,
        le=10_000_000,
        description="Finished requests kept per model for latency percentiles; the oldest are dropped first.",
    )

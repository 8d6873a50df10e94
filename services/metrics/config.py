"""Metrics collector settings: how many spans are kept, the SLO file and its time compression, cost prices."""

from __future__ import annotations

from pydantic import Field, field_validator

from services.metrics.cost import parse_prices
from services.router.model_routing import parse_aliases
from shared.settings import ServiceSettings, service_config


class MetricsSettings(ServiceSettings):
    """Settings of the metrics collector (flags --kebab-case, env FLEETSERVE_METRICS_<FIELD>)."""

    model_config = service_config("metrics")

    max_spans: int = Field(
        200_000, ge=1, le=50_000_000, description="Spans kept for GetTrace; the oldest are evicted first."
    )
    quality_recent_requests: int = Field(
        100_000,
        ge=1,
        le=10_000_000,
        description="Request ids remembered (with model and version) to label feedback that arrives without a "
        "version; the oldest are dropped first.",
    )
    slo_file: str = Field(
        "",
        description="TOML file of SLOs ([[slo]]: name, kind availability|ttft|tpot, objective, model ('*' = "
        "each model), tier, threshold_ms, period_days) and optional alert rules ([[rule]]: name, burn_rate, "
        "long_window_s, short_window_s, severity page|ticket); default: availability 99.9%, TTFT p99 < 2 s, "
        "TPOT p99 < 100 ms for every model, with the SRE workbook's four burn-rate rules.",
    )
    slo_time_scale: float = Field(
        1.0,
        gt=0,
        le=1_000_000,
        description="Divide every SLO period and alert window by this (tests and demos: 3600 makes an hour "
        "of the alert table last a second).",
    )
    slo_min_events: int = Field(
        10, ge=0, description="Fewest requests in an alert rule's short window for the rule to fire."
    )
    slo_eval_interval_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="How often the alert rules are evaluated (at most a tenth of the shortest short window "
        "after time compression).",
    )
    dashboard_port: int = Field(
        0,
        ge=-1,
        le=65535,
        description="HTTP port of the live dashboard page on --host; 0 picks a free one (in the ready file as "
        "dashboard_address), -1 turns it off.",
    )
    gpu_prices: str = Field(
        "",
        description="Price per GPU-hour in USD by replica type (GPU profile name), overriding the profiles' "
        "[pricing]: 'h100-llama-1b=2.5,l4-llama-1b=0.7'.",
    )
    model_aliases: str = Field(
        "",
        description="The router's model aliases ('alias=small-model|large-model,...'), so cost reports know "
        "which model is the large one when pricing what model routing saved.",
    )

    @field_validator("gpu_prices")
    @classmethod
    def _prices(cls, v: str) -> str:
        parse_prices(v)
        return v

    @field_validator("model_aliases")
    @classmethod
    def _aliases(cls, v: str) -> str:
        parse_aliases(v)
        return v

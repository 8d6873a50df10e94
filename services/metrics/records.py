"""Request records: one finished request as the gateway's root span describes it, and which failures count
against the fleet."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The gateway pipeline's span of one request, under the name of the front end it came through.
ROOT_SPANS = frozenset(
    {
        "gateway.Generate",
        "gateway.Chat",
        "gateway.BatchItem",
        "gateway.http.ChatCompletions",
        "gateway.http.Completions",
    }
)
ATTR_MODEL = "fleetserve.model"
ATTR_SERVED_MODEL = "fleetserve.served_model"
ATTR_VERSION = "fleetserve.model_version"
ATTR_TENANT = "fleetserve.tenant_id"
ATTR_TIER = "fleetserve.tenant_tier"
ATTR_FEATURE = "fleetserve.feature"
ATTR_REPLICA = "fleetserve.replica_id"
ATTR_REQUEST_ID = "fleetserve.request_id"
ATTR_TTFT_MS = "fleetserve.ttft_ms"
ATTR_PROMPT_TOKENS = "fleetserve.prompt_tokens"
ATTR_OUTPUT_TOKENS = "fleetserve.output_tokens"
ATTR_CACHED_TOKENS = "fleetserve.cached_tokens"
ATTR_SAFETY = "fleetserve.safety_blocked"
ATTR_DEGRADED = "fleetserve.degraded"
ATTR_STATUS = "rpc.grpc.status_code"

# gRPC codes that are not the fleet's fault: OK, the client's own mistakes (INVALID_ARGUMENT, NOT_FOUND,
# PERMISSION_DENIED, UNAUTHENTICATED), the client leaving (CANCELLED), and backpressure the client was asked
# to honour (RESOURCE_EXHAUSTED: rate limits and quotas).
NOT_FLEET_ERRORS = frozenset({0, 1, 3, 5, 7, 8, 16})
OTLP_STATUS_ERROR = 2
GRPC_UNKNOWN = 2
# Labels that come from clients (feature tags, model names) are cut to this length before they become keys.
MAX_LABEL_LEN = 64


def is_fleet_error(status_code: int) -> bool:
    """Whether a request that ended with this gRPC status code counts against the fleet."""
    return status_code not in NOT_FLEET_ERRORS


def tpot_ms(e2e_ms: float, ttft_ms: float | None, output_tokens: int) -> float | None:
    """Mean time per output token after the first: (e2e - ttft) / (tokens - 1); None with fewer than 2."""
    if ttft_ms is None or output_tokens < 2:
        return None
    return (e2e_ms - ttft_ms) / (output_tokens - 1)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _label(value: Any) -> str:
    return value[:MAX_LABEL_LEN] if isinstance(value, str) else ""


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One finished request as the gateway saw it."""

    end_unix_s: float
    e2e_ms: float
    ttft_ms: float | None
    output_tokens: int
    status_code: int
    # The model that served it (behind an alias: the alias's pick), and the name the client asked for.
    model: str = ""
    requested_model: str = ""
    version: str = ""
    tenant: str = ""
    tier: str = ""
    feature: str = ""
    replica_id: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    trace_id: str = ""
    request_id: str = ""
    # INPUT_BLOCKED / OUTPUT_BLOCKED when the safety filter stopped it, else "".
    safety_blocked: str = ""
    # How the gateway degraded it under load ("" when it did not): a degraded model is not model routing.
    degraded: str = ""

    @property
    def tpot_ms(self) -> float | None:
        return tpot_ms(self.e2e_ms, self.ttft_ms, self.output_tokens)

    @property
    def fleet_error(self) -> bool:
        return is_fleet_error(self.status_code)

    @property
    def asked_model(self) -> str:
        """The model name the client used (an alias stays the alias): what latency stats and SLOs are kept by,
        since a request that failed before its first token has no served model."""
        return self.requested_model or self.model

    @property
    def routed_by_alias(self) -> bool:
        """Served by another model than the one asked for because the name was a routing alias."""
        return bool(self.requested_model) and self.requested_model != self.model and not self.degraded


def record_from_span(
    start_unix_nano: int,
    end_unix_nano: int,
    attrs: Mapping[str, Any],
    otlp_status_code: int = 0,
    trace_id: str = "",
) -> RequestRecord | None:
    """The record of a gateway root span from its times and attributes; None without a model."""
    requested = _label(attrs.get(ATTR_MODEL))
    served = _label(attrs.get(ATTR_SERVED_MODEL)) or requested
    if not served:
        return None
    status = attrs.get(ATTR_STATUS)
    if not isinstance(status, int) or isinstance(status, bool):
        # No gRPC code recorded: trust the span's own status.
        status = GRPC_UNKNOWN if otlp_status_code == OTLP_STATUS_ERROR else 0
    return RequestRecord(
        end_unix_s=end_unix_nano / 1e9,
        e2e_ms=max(0, end_unix_nano - start_unix_nano) / 1e6,
        ttft_ms=_num(attrs.get(ATTR_TTFT_MS)),
        output_tokens=max(0, int(_num(attrs.get(ATTR_OUTPUT_TOKENS)) or 0)),
        status_code=status,
        model=served,
        requested_model=requested,
        version=_label(attrs.get(ATTR_VERSION)),
        tenant=_label(attrs.get(ATTR_TENANT)),
        tier=_label(attrs.get(ATTR_TIER)),
        feature=_label(attrs.get(ATTR_FEATURE)),
        replica_id=_label(attrs.get(ATTR_REPLICA)),
        prompt_tokens=max(0, int(_num(attrs.get(ATTR_PROMPT_TOKENS)) or 0)),
        cached_tokens=max(0, int(_num(attrs.get(ATTR_CACHED_TOKENS)) or 0)),
        trace_id=trace_id,
        request_id=_label(attrs.get(ATTR_REQUEST_ID)),
        safety_blocked=_label(attrs.get(ATTR_SAFETY)),
        degraded=_label(attrs.get(ATTR_DEGRADED)),
    )

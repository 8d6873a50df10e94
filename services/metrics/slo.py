"""Service-level math: per-model request records from the gateway's root spans, and their percentiles."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
from fleetserve.metrics.v1 import metrics_service_pb2 as mpb

log = structlog.get_logger(__name__)

ROOT_SPAN = "gateway.Generate"
ATTR_MODEL = "fleetserve.model"
ATTR_TTFT_MS = "fleetserve.ttft_ms"
ATTR_OUTPUT_TOKENS = "fleetserve.output_tokens"
ATTR_STATUS = "rpc.grpc.status_code"

# gRPC codes that are not the fleet's fault: OK, the client's own mistakes (INVALID_ARGUMENT, NOT_FOUND,
# PERMISSION_DENIED, UNAUTHENTICATED), the client leaving (CANCELLED), and backpressure the client was asked
# to honour (RESOURCE_EXHAUSTED: rate limits and quotas).
NOT_FLEET_ERRORS = frozenset({0, 1, 3, 5, 7, 8, 16})
OTLP_STATUS_ERROR = 2
GRPC_UNKNOWN = 2
# Model names come from clients; a bound keeps a flood of made-up names from growing memory without limit.
MAX_MODELS = 1024


def is_fleet_error(status_code: int) -> bool:
    """Whether a request that ended with this gRPC status code counts against the fleet."""
    return status_code not in NOT_FLEET_ERRORS


def tpot_ms(e2e_ms: float, ttft_ms: float | None, output_tokens: int) -> float | None:
    """Mean time per output token after the first: (e2e - ttft) / (tokens - 1); None with fewer than 2."""
    if ttft_ms is None or output_tokens < 2:
        return None
    return (e2e_ms - ttft_ms) / (output_tokens - 1)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One finished request as the gateway saw it."""

    end_unix_s: float
    e2e_ms: float
    ttft_ms: float | None
    output_tokens: int
    status_code: int

    @property
    def tpot_ms(self) -> float | None:
        return tpot_ms(self.e2e_ms, self.ttft_ms, self.output_tokens)

    @property
    def fleet_error(self) -> bool:
        return is_fleet_error(self.status_code)


def record_from_span(
    start_unix_nano: int, end_unix_nano: int, attrs: Mapping[str, Any], otlp_status_code: int = 0
) -> tuple[str, RequestRecord] | None:
    """(model, record) from a gateway.Generate span's times and attributes; None without a model."""
    model = attrs.get(ATTR_MODEL)
    if not model or not isinstance(model, str):
        return None
    status = attrs.get(ATTR_STATUS)
    if not isinstance(status, int) or isinstance(status, bool):
        # No gRPC code recorded: trust the span's own status.
        status = GRPC_UNKNOWN if otlp_status_code == OTLP_STATUS_ERROR else 0
    ttft = attrs.get(ATTR_TTFT_MS)
    ttft = float(ttft) if isinstance(ttft, int | float) and not isinstance(ttft, bool) else None
    tokens = attrs.get(ATTR_OUTPUT_TOKENS)
    tokens = int(tokens) if isinstance(tokens, int | float) and not isinstance(tokens, bool) else 0
    e2e_ms = max(0, end_unix_nano - start_unix_nano) / 1e6
    return model, RequestRecord(end_unix_nano / 1e9, e2e_ms, ttft, max(0, tokens), status)


def summarize(values: Iterable[float]) -> mpb.LatencySummary:
    """Count and p50/p95/p99 (numpy's linear interpolation) of values; all zero when there are none."""
    arr = np.fromiter(values, dtype=np.float64)
    if arr.size == 0:
        return mpb.LatencySummary()
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return mpb.LatencySummary(count=int(arr.size), p50=float(p50), p95=float(p95), p99=float(p99))


def model_stats(model: str, records: list[RequestRecord]) -> mpb.ModelStats:
    """One model's summary over records. E2E counts requests that finished OK (a rejected or cancelled
    request's duration says nothing about serving latency); TTFT and TPOT count every request that got
    that far."""
    requests = len(records)
    errors = sum(1 for r in records if r.fleet_error)
    return mpb.ModelStats(
        model=model,
        requests=requests,
        errors=errors,
        error_rate=errors / requests if requests else 0.0,
        ttft_ms=summarize(r.ttft_ms for r in records if r.ttft_ms is not None),
        tpot_ms=summarize(t for r in records if (t := r.tpot_ms) is not None),
        e2e_ms=summarize(r.e2e_ms for r in records if r.status_code == 0),
        output_tokens=sum(r.output_tokens for r in records),
    )


class SloStats:
    """Recent request records per model, at most max_records_per_model each (the oldest are dropped)."""

    def __init__(
        self, max_records_per_model: int, clock: Callable[[], float] = time.time, max_models: int = MAX_MODELS
    ) -> None:
        self.max_records_per_model = max_records_per_model
        self.max_models = max_models
        self._clock = clock
        self._records: dict[str, deque[RequestRecord]] = {}
        self.dropped_models = 0

    def add(self, model: str, record: RequestRecord) -> None:
        records = self._records.get(model)
        if records is None:
            if len(self._records) >= self.max_models:
                self.dropped_models += 1
                if self.dropped_models == 1:
                    log.warning("metrics.too_many_models", max_models=self.max_models, model=model)
                return
            records = self._records[model] = deque(maxlen=self.max_records_per_model)
        records.append(record)

    def add_span(
        self, start_unix_nano: int, end_unix_nano: int, attrs: Mapping[str, Any], otlp_status_code: int = 0
    ) -> bool:
        """Record a gateway.Generate span; False if it names no model."""
        got = record_from_span(start_unix_nano, end_unix_nano, attrs, otlp_status_code)
        if got is None:
            return False
        self.add(*got)
        return True

    def models(self) -> list[str]:
        return sorted(self._records)

    def query(self, model: str = "", window_s: float = 0.0, now: float | None = None) -> list[mpb.ModelStats]:
        """Per-model stats of requests that ended in the last window_s seconds (0: all kept), for model or
        every model; models with no request in the window are left out."""
        cutoff = None
        if window_s > 0:
            cutoff = (self._clock() if now is None else now) - window_s
        names = [model] if model else sorted(self._records)
        out = []
        for name in names:
            records = self._records.get(name)
            if not records:
                continue
            chosen = list(records) if cutoff is None else [r for r in records if r.end_unix_s >= cutoff]
            if chosen:
                out.append(model_stats(name, chosen))
        return out

"""Where the registry reads outcomes: the metrics service's Query per (model, version, window) for guardrails, and
QueryArms per experiment for A/B analysis."""

from __future__ import annotations

from typing import Protocol

from fleetserve.metrics.v1 import metrics_service_pb2 as mpb
from fleetserve.metrics.v1 import metrics_service_pb2_grpc as mgrpc

from services.registry.rollouts.guardrails import VersionStats
from shared.channels import open_channel
from shared.tls import Tls


class StatsSource(Protocol):
    """Numbers of one model version over the last window_s seconds."""

    async def fetch(self, model: str, version: str, window_s: float) -> VersionStats: ...


class MetricsServiceSource:
    """StatsSource over fleetserve.metrics.v1.MetricsService/Query with its model_version filter."""

    def __init__(self, address: str, timeout_s: float = 2.0, tls: Tls | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = open_channel(address, tls)
        self._stub = mgrpc.MetricsServiceStub(self._channel)

    async def fetch(self, model: str, version: str, window_s: float) -> VersionStats:
        resp = await self._stub.Query(
            mpb.QueryRequest(model=model, model_version=version, window_s=window_s), timeout=self.timeout_s
        )
        for m in resp.models:
            if m.model == model:
                return VersionStats(
                    requests=m.requests,
                    errors=m.errors,
                    ttft_p99_ms=m.ttft_ms.p99,
                    ttft_p50_ms=m.ttft_ms.p50,
                    ttft_count=m.ttft_ms.count,
                    tpot_p99_ms=m.tpot_ms.p99,
                    tpot_p50_ms=m.tpot_ms.p50,
                    tpot_count=m.tpot_ms.count,
                    output_tokens=m.output_tokens,
                    refusals=m.refusals,
                    refusal_checked=m.refusal_checked,
                    feedback_count=m.feedback_count,
                    feedback_mean=m.feedback_mean,
                    cost_usd=m.cost_usd,
                )
        return VersionStats()

    async def arms(self, experiment: str, limit: int) -> list[mpb.ArmSamples]:
        """Per-arm summaries of an experiment over the first `limit` samples of each metric."""
        resp = await self._stub.QueryArms(
            mpb.QueryArmsRequest(experiment=experiment, limit=limit), timeout=self.timeout_s
        )
        return list(resp.arms)

    async def close(self) -> None:
        await self._channel.close(grace=None)

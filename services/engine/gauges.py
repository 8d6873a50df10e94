"""OTLP gauges of an engine replica that the metrics service reads: how long it has been up (its GPU time, which
cost attribution prices) and how full its KV cache is (the dashboard)."""

from __future__ import annotations

import time
from collections.abc import Callable

from fleetserve.common.v1 import common_pb2
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation


class EngineGauges:
    """Observable gauges; the metric reader calls them from its own thread, so they only read values the event
    loop wrote (sample(), which wraps the backend's load() for the heartbeats)."""

    def __init__(
        self,
        meter: metrics.Meter,
        load: Callable[[], common_pb2.ReplicaLoad],
        *,
        replica_id: str,
        model: str,
        model_version: str,
        replica_type: str,
    ) -> None:
        self._load = load
        self._started = time.monotonic()
        self._kv_usage: float | None = None
        self._attrs = {
            "replica_id": replica_id,
            "model": model,
            "model_version": model_version,
            "replica_type": replica_type,
        }
        meter.create_observable_gauge(
            "fleetserve.engine.uptime",
            callbacks=[self._uptime],
            unit="s",
            description="Seconds since the replica started (its GPU time, for cost), by replica and type.",
        )
        meter.create_observable_gauge(
            "fleetserve.engine.kv_cache_usage",
            callbacks=[self._kv],
            unit="1",
            description="Fraction of the replica's KV-cache blocks in use, at its last heartbeat.",
        )

    def sample(self) -> common_pb2.ReplicaLoad:
        """The backend's load (on the event loop), remembering what the gauges report."""
        load = self._load()
        if load.kv_blocks_total:
            self._kv_usage = load.kv_blocks_used / load.kv_blocks_total
        return load

    def _uptime(self, options: CallbackOptions):
        yield Observation(time.monotonic() - self._started, self._attrs)

    def _kv(self, options: CallbackOptions):
        if self._kv_usage is not None:
            yield Observation(self._kv_usage, {"replica_id": self._attrs["replica_id"]})
